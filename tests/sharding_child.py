"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices (XLA_FLAGS is set
before jax starts): trains tiny models on several meshes through the real Trainer (pipelined
meshes included), saves on one mesh and restores on others (a stage=4 pipeline's checkpoint on
stage=1 and stage=2), SIGKILLs and resumes a stage=2 `nagjax train` process, and prints one JSON
object of losses and checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from conftest import TINY_RUN
from nagjax import runtime, sharding
from nagjax.config import apply_overrides
from nagjax.registry import get_experiment, load_experiments
from nagjax.train import trainer as trainer_mod
from nagjax.train.checkpoint import CheckpointStore
from nagjax.train.logging import read_metrics

STEPS = 3
TINY = [
    *TINY_RUN, "data.batch_size=8", "train.eval_every=0", "train.eval_batches=1",
    "train.checkpoint_every=0", "train.log_every=1", "optim.warmup_steps=1",
]
# name -> (data, fsdp, tensor), or (stage, data, fsdp, tensor) for a pipelined mesh ("s<stage>-...")
MESHES = {"8,1,1": (8, 1, 1), "2,4,1": (2, 4, 1), "2,2,2": (2, 2, 2)}
# The pipelined variant runs one step more and checkpoints at STEPS as well: its stage=4 run is the
# uninterrupted run that the restores of its step-STEPS checkpoint (on stage=1 and stage=2) continue.
PIPE_STEPS = STEPS + 1
PIPE_MESHES = {"s2-2,2,1": (2, 2, 2, 1), "s4-2,1,1": (4, 2, 1, 1)}


# Mixture-of-Depths (gather/scatter of the top-k tokens) under sharding: one mesh is enough.
VARIANTS = {"prenorm": (["model.residual=prenorm"], MESHES),
            "nag": (["model.residual=nag"], MESHES),
            "nag_mod": (["model.residual=nag", "mod.rate=0.5"], {"2,2,2": (2, 2, 2)}),
            # the Pallas update (interpret mode on CPU) per batch shard under shard_map, under remat,
            # on the dense first block and on the MoD top-k rows of the second
            "nag_kernel": (["model.residual=nag", "model.nag.kernel=pallas", "mod.rate=0.5",
                            "model.remat=full"], {"2,2,2": (2, 2, 2)}),
            # microbatches spread over the batch devices; loss chunks cut sequences, not the batch
            "nag_levers": (["model.residual=nag", "train.grad_accum=2", "train.loss_chunk_tokens=16"],
                           {"2,2,2": (2, 2, 2)}),
            # a looped stack (shared block weights gathered per executed position, per-pass residual
            # parameters) with MoD per executed (block, pass), under remat
            "nag_loop": (["model.residual=nag", "model.repeat=2", "mod.rate=0.25", "model.remat=dots"],
                         {"2,2,2": (2, 2, 2)}),
            # pipeline stages through the Trainer: the circular schedule (2 pieces per stage) under
            # gradient accumulation, stages next to data and fsdp; 16 sequences, so that each
            # pipeline microbatch (16 / grad_accum 2 / 2 or 4 microbatches) splits over the batch axes
            "nag_pipe": (["model.residual=nag", "model.depth=8", "pipeline.repeats=2", "train.grad_accum=2",
                          "data.batch_size=16", f"train.checkpoint_every={STEPS}"], PIPE_MESHES)}


def overrides(residual: str, mesh=(1, 1, 1), steps: int | None = None) -> list[str]:
    stage, (data, fsdp, tensor) = (1, mesh) if len(mesh) == 3 else (mesh[0], mesh[1:])
    steps = steps or (PIPE_STEPS if residual == "nag_pipe" else STEPS)
    return [*TINY, *VARIANTS[residual][0], f"train.steps={steps}", f"mesh.stage={stage}",
            f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]


def config(residual: str, mesh=(1, 1, 1), steps: int | None = None):
    return apply_overrides(get_experiment("quickstart"), overrides(residual, mesh, steps))


def trainer(cfg, workdir: Path, n_devices: int | None = None):
    """A Trainer on the first `n_devices` devices (default: all 8)."""
    make_mesh = sharding.make_mesh
    if n_devices is not None:
        trainer_mod.sharding.make_mesh = lambda c, devices=None: make_mesh(c, jax.devices()[:n_devices])
    try:
        return trainer_mod.Trainer(cfg, workdir)
    finally:
        trainer_mod.sharding.make_mesh = make_mesh


def params_of(t) -> list[np.ndarray]:
    """A trainer's parameters, gathered to host arrays in tree order."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(t.state["params"]))]


def resume_one_run(cfg, workdir: Path, n_devices: int | None):
    """Restore the checkpoint in `workdir` and train to `cfg`'s end: (trainer, restored params,
    the parameters' partition specs, params after the run)."""
    t = trainer(cfg, workdir, n_devices)
    restored = params_of(t)
    specs = sorted({str(s.spec) for s in jax.tree.leaves(t.state_shardings["params"])})
    t.run()
    after = params_of(t)
    t.close()
    return t, restored, specs, after


def train(cfg, workdir: Path, n_devices: int | None = None):
    """(final parameters, the trainer's start line) of a run."""
    t = trainer(cfg, workdir, n_devices)
    layout = t.layout()
    t.run()
    params = params_of(t)
    t.close()
    return params, layout


def losses(workdir: Path) -> list[float]:
    records = read_metrics(workdir / "logs" / "metrics.jsonl")
    return [records[s]["train/loss"] for s in sorted(records) if "train/loss" in records[s]]


def losses_by_step(workdir: Path) -> dict[int, float]:
    """The last logged loss of every step ({} before any)."""
    path = workdir / "logs" / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else {}
    return {s: r["train/loss"] for s, r in sorted(records.items()) if "train/loss" in r}


def main(root: Path) -> dict:
    runtime.setup()
    load_experiments()
    out = {"devices": jax.device_count(), "losses": {}, "reshard": {}, "layouts": {}}
    final = {}
    for residual, (_, meshes) in VARIANTS.items():
        runs = {}
        train(config(residual), root / f"{residual}-1dev", n_devices=1)
        runs["1"] = losses(root / f"{residual}-1dev")
        for name, mesh in meshes.items():
            final[residual, name], out["layouts"][f"{residual}/{name}"] = train(
                config(residual, mesh), root / f"{residual}-{name}")
            runs[name] = losses(root / f"{residual}-{name}")
        out["losses"][residual] = runs

    # Save on (2,2,2) after STEPS steps (the NAG run above); restore on (8,1,1) and on 1 device.
    saved_dir = root / "nag-2,2,2"
    saved = final["nag", "2,2,2"]
    for name, mesh, n_dev in (("8,1,1", (8, 1, 1), None), ("1", (1, 1, 1), 1)):
        workdir = root / f"resume-{name}"
        shutil.copytree(saved_dir, workdir)
        t, restored, specs, _ = resume_one_run(config("nag", mesh, steps=STEPS + 1), workdir, n_dev)
        out["reshard"][name] = {
            "resumed_at": t.resume_step,
            "params_identical": all(np.array_equal(a, b) for a, b in zip(saved, restored)),
            "mesh": dict(t.mesh.shape),
            "specs": specs,
            "next_loss": losses(workdir)[-1],
        }

    # The stage=4 pipeline's checkpoint of step STEPS (its layers axis split over 4 stages; the run
    # went on to PIPE_STEPS) restored without stages (1 device) and on stage=2, one step each: the
    # programs of the 1-device and stage=2 runs above (compilation cache). Only that checkpoint is
    # copied, so a resumed run's log holds only the step it computes.
    source = root / "nag_pipe-s4-2,1,1" / "checkpoints"
    first = None
    for name, mesh, n_dev in (("pipe-s1", (1, 1, 1), 1), ("pipe-s2", PIPE_MESHES["s2-2,2,1"], None)):
        workdir = root / f"resume-{name}"
        shutil.copytree(source, workdir / "checkpoints",
                        ignore=lambda d, names: [str(PIPE_STEPS)] if d == str(source) else [])
        t, restored, specs, after = resume_one_run(config("nag_pipe", mesh), workdir, n_dev)
        first = first or restored
        out["reshard"][name] = {
            "resumed_at": t.resume_step,
            "params_identical_to_first_restore": all(np.array_equal(a, b) for a, b in zip(first, restored)),
            "mesh": dict(t.mesh.shape),
            "specs": specs,
            "logged": losses_by_step(workdir),
            # the update of the step after the restore (restored optimiser moments) against the
            # uninterrupted run's: the largest difference of a parameter, relative to its array's largest entry
            "final_params_rel_diff": max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
                                         for a, b in zip(after, final["nag_pipe", "s4-2,1,1"])),
        }
    out["sigkill"] = sigkill_then_resume(root / "sigkill-s2")
    return out


def sigkill_then_resume(workdir: Path) -> dict:
    """The stage=2 run of `nag_pipe` again, as `nagjax train` processes (8 devices, this process's
    environment: its compiled programs come from the compilation cache): SIGKILLed once it has
    logged its last step, before saving it, then resumed from its step-2 checkpoint (written
    synchronously: a resumable key, certain to be committed) to the end."""
    from test_train import CHILD  # the CLI, killed at a chosen point

    cmd = [sys.executable, "-c", CHILD, "train", "--workdir", str(workdir), "--set",
           *overrides("nag_pipe", PIPE_MESHES["s2-2,2,1"]), "train.checkpoint_every=2",
           "train.async_checkpointing=false"]
    killed = subprocess.run(cmd, env={**os.environ, "KILL_AFTER_LOGGED_STEP": str(PIPE_STEPS)},
                            capture_output=True, text=True, timeout=600)
    checkpoints = workdir / "checkpoints"
    out = {"killed_rc": killed.returncode, "killed_stderr": killed.stderr[-3000:], "before": losses_by_step(workdir),
           "committed": CheckpointStore(checkpoints, read_only=True).all_steps() if checkpoints.is_dir() else []}
    resumed = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=600)
    log = workdir / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in (log.read_text().splitlines() if log.exists() else []) if line.strip()]
    return {**out, "resumed_rc": resumed.returncode, "resumed_stderr": resumed.stderr[-3000:],
            "resumed_line": next((l for l in resumed.stdout.splitlines() if "resuming" in l), ""),
            "logged_steps": [r["step"] for r in rows if "train/loss" in r], "after": losses_by_step(workdir)}


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
