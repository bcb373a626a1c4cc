"""End-to-end training through the CLI: exact resume after SIGKILL, crash-safe checkpoints,
SIGTERM handling, evaluation of a workdir, logs, clear errors for damaged checkpoints and the
fallback past a damaged latest one, and quiet read-only commands.

The runs are real `nagjax train` subprocesses on a tiny config. Crashes are injected at
deterministic points by a small wrapper that patches the child process only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TINY_RUN
from nagjax.cli import main
from nagjax.train.checkpoint import CheckpointError, CheckpointStore
from nagjax.train.logging import read_metrics
from nagjax.train.trainer import evaluate_workdir

STEPS = 12
TINY = [
    *TINY_RUN, f"train.steps={STEPS}", "train.checkpoint_every=4", "train.eval_every=6",
    "train.eval_batches=2", "train.log_every=1", "optim.warmup_steps=2",
]

# Runs in the child before the CLI: optionally kills itself at a chosen point.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    kill_after_log = int(os.environ.get("KILL_AFTER_LOGGED_STEP", "0"))
    crash_in_save = int(os.environ.get("CRASH_IN_CHECKPOINT_SAVE", "0"))
    term_after_log = int(os.environ.get("SIGTERM_AFTER_LOGGED_STEP", "0"))
    kill_in_commit = int(os.environ.get("KILL_IN_ASYNC_COMMIT", "0"))
    import threading
    logged = {"step": 0, "event": threading.Event()}
    from nagjax.train import logging as tlog
    write = tlog.ScalarWriter.write
    def patched_write(self, step, scalars):
        write(self, step, scalars)
        if "train/loss" in scalars:
            self.flush()
            logged["step"] = step
            if step > kill_in_commit:
                logged["event"].set()
            if step == kill_after_log:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == term_after_log:
                os.kill(os.getpid(), signal.SIGTERM)
    tlog.ScalarWriter.write = patched_write
    if crash_in_save:
        import orbax.checkpoint as ocp
        from nagjax.train import checkpoint as ck
        json_save = ocp.JsonCheckpointHandler.async_save
        def crashing_save(self, directory, *args, **kwargs):
            # Crash while the checkpoint of step `crash_in_save` is half written.
            if f"/{crash_in_save}.orbax-checkpoint-tmp" in str(directory):
                # Die once the half-written step is on disk: under asynchronous saves Orbax may
                # still be creating its temporary directory in another thread.
                import pathlib, time
                step_tmp = next(p for p in pathlib.Path(str(directory)).parents
                                if ".orbax-checkpoint-tmp" in p.name)
                deadline = time.monotonic() + 20
                while not step_tmp.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            return json_save(self, directory, *args, **kwargs)
        ocp.JsonCheckpointHandler.async_save = crashing_save
    if kill_in_commit:
        # SIGKILL in the background thread that commits checkpoint `kill_in_commit` (its files
        # written, not yet renamed), once the loop has logged a later step: the kill lands inside
        # an asynchronous save while training goes on (a synchronous save never gets there: the
        # wait times out and the child exits 3).
        import asyncio, inspect
        from orbax.checkpoint._src.path import atomicity
        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        def commit_or_die(self):
            if f"/{kill_in_commit}.orbax-checkpoint-tmp" in str(self._tmp_path):
                if not logged["event"].wait(timeout=20):
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGKILL)
        if inspect.iscoroutinefunction(finalize):
            async def patched_finalize(self, *args, **kwargs):
                commit_or_die(self)
                return await finalize(self, *args, **kwargs)
        else:
            def patched_finalize(self, *args, **kwargs):
                commit_or_die(self)
                return finalize(self, *args, **kwargs)
        atomicity.AtomicRenameTemporaryPath.finalize = patched_finalize
    from nagjax.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def run_train(workdir: Path, extra_env: dict | None = None, overrides=()) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    cmd = [sys.executable, "-c", CHILD, "train", "--workdir", str(workdir), "--set", *TINY, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(workdir: Path) -> dict[int, float]:
    records = read_metrics(workdir / "logs" / "metrics.jsonl")
    return {s: r["train/loss"] for s, r in records.items() if "train/loss" in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref") / "run"
    proc = run_train(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_uninterrupted_run_logs_and_checkpoints(reference_run):
    workdir, proc = reference_run
    assert "final validation loss" in proc.stdout
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]  # it learns
    records = read_metrics(workdir / "logs" / "metrics.jsonl")
    last = records[STEPS]
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "eval/loss", "eval/bpb",
                "layers/stream_rms/01_mlp", "layers/gate_mean/00_attn", "layers/alpha/01_attn"):
        assert key in last, key
    assert list(workdir.glob("logs/events.out.tfevents.*"))
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["residual"] == "nag" and config["model"]["vocab_size"] == 4096
    assert json.loads((workdir / "run_info.json").read_text())["backend"] == "cpu"
    assert CheckpointStore(workdir / "checkpoints", read_only=True).all_steps() == [8, 12]


def test_sigkill_then_resume_is_bit_exact(reference_run, tmp_path):
    ref_dir, _ = reference_run
    workdir = tmp_path / "run"
    killed = run_train(workdir, {"KILL_AFTER_LOGGED_STEP": "10"})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(losses(workdir)) == list(range(1, 11))
    # The save of step 8 may still have been in flight (asynchronous); it waited for step 4's.
    committed = CheckpointStore(workdir / "checkpoints", read_only=True).all_steps()
    assert committed in ([4], [4, 8]), committed
    resumed = run_train(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and f"at step {committed[-1]}" in resumed.stdout
    assert losses(workdir) == losses(ref_dir)  # every step, to the bit


def test_sigkill_inside_an_asynchronous_save_resumes_bit_exact(reference_run, tmp_path):
    """Killed while checkpoint 8 is written in the background and the loop has gone on: 8 is
    never listed, the run resumes from 4 and redoes every step to the bit."""
    ref_dir, _ = reference_run
    workdir = tmp_path / "run"
    killed = run_train(workdir, {"KILL_IN_ASYNC_COMMIT": "8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(losses(workdir)) > 8  # training went on during the save
    assert any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir())
    assert CheckpointStore(workdir / "checkpoints", read_only=True).all_steps() == [4]
    resumed = run_train(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    assert losses(workdir) == losses(ref_dir)
    assert CheckpointStore(workdir / "checkpoints", read_only=True).all_steps() == [8, 12]


def test_crash_during_checkpoint_write_is_never_restored(reference_run, tmp_path):
    ref_dir, _ = reference_run
    workdir = tmp_path / "run"
    crashed = run_train(workdir, {"CRASH_IN_CHECKPOINT_SAVE": "8"})
    assert crashed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert any("tmp" in name for name in leftovers), leftovers  # a half-written step 8 exists
    assert CheckpointStore(workdir / "checkpoints", read_only=True).all_steps() == [4]
    resumed = run_train(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    assert losses(workdir) == losses(ref_dir)
    assert not any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())


def test_sigterm_saves_and_exits_cleanly(reference_run, tmp_path):
    ref_dir, _ = reference_run
    workdir = tmp_path / "run"
    stopped = run_train(workdir, {"SIGTERM_AFTER_LOGGED_STEP": "5"})
    assert stopped.returncode == 128 + signal.SIGTERM == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"nagjax: SIGTERM: saved checkpoint at step 5 in {workdir / 'checkpoints'}; exiting")
    assert "Traceback" not in stopped.stderr
    assert 5 in CheckpointStore(workdir / "checkpoints", read_only=True).all_steps()
    resumed = run_train(workdir)
    assert resumed.returncode == 0 and "at step 5" in resumed.stdout
    assert losses(workdir) == losses(ref_dir)


def test_eval_workdir_matches_training_eval(reference_run, capsys):
    workdir, _ = reference_run
    out = evaluate_workdir(workdir)
    logged = read_metrics(workdir / "logs" / "metrics.jsonl")[STEPS]
    assert out["step"] == STEPS
    assert out["loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)
    assert out["bpb"] == pytest.approx(logged["eval/bpb"], rel=1e-6)
    assert main(["eval", "--workdir", str(workdir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == STEPS


def test_resume_with_different_model_is_refused(reference_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    rc = main(["train", "--workdir", str(workdir), "--set", *TINY, "model.depth=3"])
    assert rc == 2
    assert "model.depth: saved 2 vs requested 3" in capsys.readouterr().err


def _corrupt_state(checkpoint: Path) -> None:
    for f in (checkpoint / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 8)


def test_corrupt_or_missing_checkpoint_gives_clear_error(reference_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    _corrupt_state(workdir / "checkpoints" / "12")
    with pytest.raises(CheckpointError, match=r"checkpoints/12 is unreadable or corrupt.*Delete"):
        evaluate_workdir(workdir)
    rc = main(["eval", "--workdir", str(tmp_path / "nowhere")])
    assert rc == 2 and "nagjax train --workdir" in capsys.readouterr().err


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path, capsys):
    ref_dir, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    checkpoints = workdir / "checkpoints"
    _corrupt_state(checkpoints / "12")
    (workdir / "logs" / "metrics.jsonl").write_text("")  # keep only what the resumed run logs
    damaged = sorted(p.name for p in (checkpoints / "12").rglob("*"))

    # strict: today's stop, naming the checkpoint; nothing moved
    rc = main(["train", "--workdir", str(workdir), "--set", *TINY, "train.strict_resume=true"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoints / '12'} is unreadable or corrupt" in err
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("_")) == ["12", "8"]

    # default: one line naming it and the error, moved aside (kept), resumed from step 8 exactly
    assert main(["train", "--workdir", str(workdir), "--set", *TINY]) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "failed to restore" in line]
    assert len(notes) == 1 and notes[0].startswith(f"[nagjax] checkpoint {checkpoints / '12'} failed to restore (")
    assert notes[0].endswith(f"moved it to {checkpoints / '12.corrupt'}, using step 8")
    assert "resuming" in out and "at step 8" in out
    assert sorted(p.name for p in (checkpoints / "12.corrupt").rglob("*")) == damaged  # preserved
    assert CheckpointStore(checkpoints, read_only=True).all_steps() == [8, 12]  # a new, good 12
    ref = losses(ref_dir)
    assert losses(workdir) == {s: ref[s] for s in range(9, STEPS + 1)}  # steps 9-12, to the bit


def test_sigint_during_eval_is_one_line_and_exit_130(reference_run, monkeypatch, capsys):
    from nagjax.data import pipeline

    eval_sets = pipeline.eval_sets

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return eval_sets(*args, **kwargs)

    monkeypatch.setattr(pipeline, "eval_sets", interrupted)
    assert main(["eval", "--workdir", str(reference_run[0])]) == 130
    assert capsys.readouterr().err == "nagjax: SIGINT: interrupted; exiting\n"


def test_read_only_commands_print_no_library_warnings(reference_run):
    proc = subprocess.run([sys.executable, "-m", "nagjax.cli", "eval", "--workdir", str(reference_run[0])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"step {STEPS}: validation loss")
    assert "WARNING" not in proc.stderr and "read_only" not in proc.stderr, proc.stderr


def test_checkpoint_without_bad_step_counters_still_restores(reference_run, tmp_path):
    """Runs started before `aux.guard` existed resume and evaluate (with fresh counters)."""
    from nagjax.analysis.diagnostics import load_run

    run = load_run(reference_run[0])
    older = {**run.state, "aux": {k: v for k, v in run.state["aux"].items() if k != "guard"}}
    store = CheckpointStore(tmp_path / "old" / "checkpoints")
    store.save(run.step, older, run.data_state, run.config.to_dict())
    store.close()
    assert evaluate_workdir(tmp_path / "old") == evaluate_workdir(reference_run[0])
    guard = load_run(tmp_path / "old").state["aux"]["guard"]
    assert {k: int(v) for k, v in guard.items() if k != "loss_ema"} == {
        "good_steps": 0, "bad_streak": 0, "skipped_steps": 0, "rollbacks": 0}
