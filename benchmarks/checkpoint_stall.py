"""How long a checkpoint save stalls training: synchronous vs asynchronous (`train.async_checkpointing`).

Builds the trainer exactly as `nagjax train` does (about 125M parameters by default: d=768, 12
blocks, vocabulary 32768; AdamW moments make the checkpoint ~3x the parameters), runs a few steps,
saves after step `--save-at`, and times every step from its input to its loss on the host,
the save call included in the step it follows. Prints per mode: the median step without a save, the
save step, the stall (save step - median), the steps after it while a background save competes
for the CPU, and the time to commit (`store.wait()` after the loop). Each mode writes to its own
fresh workdir; the compiled step is shared.

    python benchmarks/checkpoint_stall.py --save            # CPU: ~125M, batch 2 x 64 tokens
    python benchmarks/checkpoint_stall.py --size tiny       # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import command_line, save  # noqa: E402 - the shared saving helper
from nagjax import sharding
from nagjax.config import apply_overrides
from nagjax.registry import get_experiment, load_experiments
from nagjax.runtime import enable_compilation_cache
from nagjax.train.trainer import Trainer

SIZES = {
    "125m": ["model.d_model=768", "model.depth=12", "model.n_heads=12", "model.d_ff=3072",
             "model.vocab_size=32768", "data.seq_len=64", "data.batch_size=2"],
    "tiny": ["model.d_model=64", "model.depth=2", "model.n_heads=2", "model.d_ff=128",
             "data.seq_len=32", "data.batch_size=2"],
}


def time_mode(config, workdir: Path, steps: int, save_at: int) -> dict:
    trainer = Trainer(config, workdir)
    try:
        state, times = trainer.state, []
        for i in range(steps):
            start = time.perf_counter()
            batch = sharding.global_batch(trainer.mesh, next(trainer.data))
            state, metrics = trainer.steps.train(state, batch, i)
            float(metrics["loss"])  # the host waits for the step, as the trainer's logging does
            if i + 1 == save_at:
                trainer.state = state
                trainer.save(i + 1)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.store.wait()
        commit = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*") if f.is_file())
    finally:
        trainer.close()
    plain = [t for i, t in enumerate(times) if i not in (0, save_at - 1)]  # step 1 compiles
    median = statistics.median(plain)
    after = times[save_at:save_at + 3]
    return {"median": median, "save_step": times[save_at - 1], "stall": times[save_at - 1] - median,
            "after": after, "commit_wait": commit, "bytes": size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="125m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=4)
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/checkpoint_stall_<device>.txt")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    load_experiments()
    base = apply_overrides(get_experiment("quickstart"), [
        *SIZES[args.size], f"train.steps={args.steps + 1}", "train.progress_bar=false", "train.checkpoint_every=0",
        "train.eval_every=0", "train.loggers=", "train.keep_checkpoints=1"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            config = apply_overrides(base, [f"train.async_checkpointing={mode == 'async'}"])
            rows[mode] = time_mode(config, Path(tmp) / mode, args.steps, args.save_at)
    lines = [
        f"# checkpoint save stall, load average {os.getloadavg()[0]:.1f}",
        f"# model: {' '.join(SIZES[args.size])}; checkpoint {rows['sync']['bytes'] / 2**20:,.0f} MiB on local disk",
        f"{'mode':6} {'step s (median)':>16} {'save step s':>12} {'stall s':>8} {'next 3 steps s':>22} {'commit wait s':>14}",
    ]
    for mode, r in rows.items():
        after = " ".join(f"{t:.2f}" for t in r["after"])
        lines.append(f"{mode:6} {r['median']:16.2f} {r['save_step']:12.2f} {r['stall']:8.2f} {after:>22} "
                     f"{r['commit_wait']:14.2f}")
    lines.append("# stall: the save step's time minus the median step; commit wait: store.wait() after the "
                 "last step (async: what was still being written; sync: 0)")
    print("\n".join(lines))
    if args.save:
        save("checkpoint_stall", lines, command=command_line("checkpoint_stall.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
