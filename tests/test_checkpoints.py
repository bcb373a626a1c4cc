"""Checkpoints at scale: asynchronous saves, fallback only on real corruption, hosts that agree on
the step to restore, one trainer per workdir, and clean exits.

Corruption is made for real (garbled, truncated and deleted files of an Orbax checkpoint); storage
errors are injected into Orbax's restore (`CompositeCheckpointHandler.restore`; as root, chmod cannot make one). The
multi-process test runs launch/local.py's 2-process CPU job with a fault injected into process 1
only, through a `sitecustomize` on the children's path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TINY_RUN
from nagjax.cli import main
from nagjax.train import checkpoint as ck
from nagjax.train.checkpoint import CheckpointError, CheckpointStore, restore_agreed
from nagjax.train.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLocked

ROOT = Path(__file__).resolve().parents[1]


def small_state(seed: float = 0.0) -> dict:
    return {"w": jnp.arange(64.0).reshape(8, 8) + seed, "b": {"c": jnp.ones((16,)) * seed}}


def abstract(state: dict) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    """Steps 1 and 2 of a small state (2's arrays differ), written asynchronously."""
    with CheckpointStore(tmp_path / "checkpoints", asynchronous=True) as store:
        store.save(1, small_state(1.0), {"next": 1}, {"name": "x"})
        store.save(2, small_state(2.0), {"next": 2}, {"name": "x"})
    return tmp_path / "checkpoints"


def restore_from(store: CheckpointStore):
    return lambda step: store.restore(abstract(small_state()), step)


def garble(c: Path):
    for f in (c / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 8)


def truncate(c: Path):
    for f in (c / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_a_byte(c: Path):
    for f in (c / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))


def drop_data_files(c: Path):
    for f in (c / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.unlink()


def garble_json_item(c: Path):
    (c / "data" / "metadata").write_text("{not json")


def drop_json_item(c: Path):
    (c / "config" / "metadata").unlink()


def drop_state_item(c: Path):
    shutil.rmtree(c / "state")


@pytest.mark.parametrize("damage", [garble, truncate, flip_a_byte, drop_data_files, garble_json_item,
                                    drop_json_item, drop_state_item])
def test_damaged_files_are_corruption_and_fall_back_with_a_note(two_checkpoints, damage, capsys):
    damage(two_checkpoints / "2")
    with CheckpointStore(two_checkpoints) as store:
        with pytest.raises(CheckpointError) as e:
            store.restore(abstract(small_state()), 2)
        assert e.value.kind == "corrupt", e.value
        lines = []
        step, (state, data, _) = restore_agreed(store, restore_from(store), report=lines.append)
    assert step == 1 and data == {"next": 1}
    assert np.array_equal(state["w"], small_state(1.0)["w"])
    assert len(lines) == 1 and f"checkpoint {two_checkpoints / '2'} failed to restore (" in lines[0]
    assert lines[0].endswith(f"moved it to {two_checkpoints / '2.corrupt'}, using step 1")
    assert (two_checkpoints / "2.corrupt").is_dir() and not (two_checkpoints / "2").exists()
    note = (two_checkpoints / ck.CORRUPT_NOTE).read_text().splitlines()
    assert len(note) == 1 and " step 2 moved to 2.corrupt: " in note[0]
    assert note[0][:4].isdigit()  # starts with the time


def _failing_restore(monkeypatch, step: int, error: BaseException, times: int) -> list:
    """Orbax's restore of checkpoint `step` raises `error` the first `times` calls."""
    calls = []
    original = ocp.CompositeCheckpointHandler.restore

    def restore(self, directory, *args, **kwargs):
        if Path(directory).name == str(step):
            calls.append(step)
            if len(calls) <= times:
                raise error
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "restore", restore)
    monkeypatch.setattr(ck, "RETRY_DELAYS", (0.01, 0.01))
    return calls


def test_a_transient_read_error_is_retried_and_moves_nothing(two_checkpoints, monkeypatch, capsys):
    """The reported bug: one PermissionError moved a good step 2 aside and resumed from 1."""
    calls = _failing_restore(monkeypatch, 2, PermissionError(13, "Permission denied"), times=1)
    with CheckpointStore(two_checkpoints) as store:
        step, (state, _, _) = restore_agreed(store, restore_from(store))
    assert step == 2 and len(calls) == 2 and np.array_equal(state["w"], small_state(2.0)["w"])
    assert "retrying in 0.01 s" in capsys.readouterr().err
    assert sorted(p.name for p in two_checkpoints.iterdir() if not p.name.startswith("_")) == ["1", "2"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error"),
                                   ValueError("UNAVAILABLE: the bucket is having a bad day")])
def test_a_lasting_storage_error_stops_naming_the_step_and_cause(two_checkpoints, monkeypatch, error):
    calls = _failing_restore(monkeypatch, 2, error, times=99)
    with CheckpointStore(two_checkpoints) as store:
        with pytest.raises(CheckpointError) as e:
            restore_agreed(store, restore_from(store))
    assert e.value.kind == "transient" and len(calls) == 3  # tried, then after each delay
    message = str(e.value)
    assert message.startswith(f"step 2: could not read checkpoint {two_checkpoints / '2'} ({type(error).__name__}")
    assert "nothing was moved" in message and "tried 3 times" in message
    assert sorted(p.name for p in two_checkpoints.iterdir() if not p.name.startswith("_")) == ["1", "2"]


def test_a_state_that_does_not_fit_stops_without_falling_back(two_checkpoints):
    """Another nagjax's layout is not damage: stop, move nothing."""
    with CheckpointStore(two_checkpoints) as store:
        other = {**abstract(small_state()), "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}
        with pytest.raises(CheckpointError, match="does not fit this run's state") as e:
            restore_agreed(store, lambda s: store.restore(other, s))
    assert e.value.kind == "other" and (two_checkpoints / "2").is_dir()


def test_asynchronous_saves_keep_at_most_one_in_flight(tmp_path):
    with CheckpointStore(tmp_path / "ck", asynchronous=True, keep=5) as store:
        store.save(1, small_state(1.0), {}, {})
        store.save(2, small_state(2.0), {}, {})
        assert 1 in store.all_steps()  # committed before save 2 started
        store.wait()
        assert store.all_steps() == [1, 2] and not store.saving()
        state, _, _ = store.restore(abstract(small_state()), 2)
        assert np.array_equal(state["b"]["c"], small_state(2.0)["b"]["c"])


# --- one trainer per workdir ------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from nagjax.train.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLocked, match=rf"in use by another `nagjax train` \(host .*, pid {holder.pid},"):
            WorkdirLock(tmp_path).acquire()
        rc = main(["train", "--workdir", str(tmp_path), "--set", *TINY_RUN])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"nagjax: error: {tmp_path} is in use by another `nagjax train`")
        assert f"pid {holder.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = WorkdirLock(tmp_path)
    stale = lock.acquire()  # the kernel dropped the killed holder's lock
    assert stale is not None and f"pid {holder.pid}" in stale
    assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    again = WorkdirLock(tmp_path)
    assert again.acquire() is None  # a clean release leaves no stale holder
    again.release()


# --- clean exits ------------------------------------------------------------------------------

def test_a_missing_data_source_is_one_line_every_time(tmp_path):
    """Three runs at once (the traceback at interpreter exit came in 3 of 5 runs)."""
    cmd = [sys.executable, "-m", "nagjax.cli", "train", "--workdir", str(tmp_path / "run"),
           "--set", *TINY_RUN, "data.source=/nonexistent/shards"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert "Traceback" not in err and "Exception" not in err, err
        assert err.strip().splitlines()[-1].startswith("nagjax: error: ") and "/nonexistent/shards" in err
    assert not (tmp_path / "run").exists()  # bad input touches nothing


# --- hosts agree --------------------------------------------------------------------------------

# On the children's path: process 1 (only) fails to read checkpoint FAIL_STEP, as FAIL_KIND says.
SITECUSTOMIZE = textwrap.dedent("""
    import os
    spec = os.environ.get("NAGJAX_TEST_FAIL_RESTORE")
    if spec and os.environ.get("NAGJAX_PROCESS_ID") == "1":
        step, kind = spec.split(":")
        import orbax.checkpoint as ocp
        from nagjax.train import checkpoint as ck
        ck.RETRY_DELAYS = (0.05,)
        original = ocp.CompositeCheckpointHandler.restore
        def restore(self, directory, *args, **kwargs):
            if str(directory).endswith("/" + step):
                if kind == "permission":
                    raise PermissionError(13, "Permission denied", str(directory))
                raise ValueError("DATA_LOSS: injected damage that only process 1 reads")
            return original(self, directory, *args, **kwargs)
        ocp.CompositeCheckpointHandler.restore = restore
""")

MP_RUN = [*TINY_RUN, "train.steps=4", "train.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1",
          "train.log_every=1", "optim.warmup_steps=1"]


def launch_two(workdir: Path, fail: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NAGJAX_TEST_FAIL_RESTORE": fail,
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--devices-per-process", "1",
         "--", "train", "--workdir", str(workdir), "--set", *MP_RUN],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_two_processes_stop_together_or_fall_back_together(tmp_path):
    workdir = tmp_path / "run"
    assert main(["train", "--workdir", str(workdir), "--set", *MP_RUN]) == 0  # checkpoints 2 and 4
    checkpoints = workdir / "checkpoints"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    # Process 1 cannot read step 4 (a storage error): both stop, nothing moved, no hang.
    proc = launch_two(workdir, "4:permission", site)
    out = proc.stdout
    assert proc.returncode == 2, out[-4000:]
    assert f"[p1] nagjax: error: step 4: could not read checkpoint {checkpoints / '4'} (PermissionError" in out
    assert "[p0] nagjax: error: process(es) [1] could not read or list checkpoint" in out
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("_")) == ["2", "4"]

    # Process 1 finds step 4 damaged: both resume from step 2; process 0 moves 4 aside, once.
    proc = launch_two(workdir, "4:damaged", site)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    moved = [line for line in out.splitlines() if "failed to restore" in line]
    assert len(moved) == 1 and moved[0].startswith(f"[p0] [nagjax] checkpoint {checkpoints / '4'} failed to "
                                                   "restore (reported by process(es) [1]); moved it to")
    assert out.count("resuming") == 2 and "[p1] [nagjax] resuming" in out and "at step 2/4" in out
    assert (checkpoints / "4.corrupt").is_dir() and (checkpoints / "4").is_dir()  # a new step 4
    assert "step 4 moved to 4.corrupt: reported by process(es) [1]" in (checkpoints / ck.CORRUPT_NOTE).read_text()
