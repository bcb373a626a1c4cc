"""What Attention Residuals' cross-stage cache saves: collective-permute bytes of a pipelined train
step with and without it (`pipeline.cross_stage_cache`), from the compiled HLO's census
(nagjax/analysis/hlo.py), against the hop arithmetic.

    python benchmarks/pipeline_attnres_cache.py [--save]

Compiles (does not run) one train step per row on 8 forced CPU devices (4 stages x 2 data): a
microbatch crosses p v hops; without the cache every hop carries the whole source buffer (N slots),
with it a window of W slots (the summaries written since the receiving stage last held that
microbatch). Per microbatch that is p v N slots (O(N^2 d) when p v ~ N, as with Full AttnRes)
against the sum of the windows (O(N d): each summary crosses about p hops). Predicted bytes per
device and step = 3 x iterations x (slots x local rows x t x d + the `filled` mask N x local rows
x t) x 4 bytes: one permute per iteration forward, and two backward (XLA lowers the transpose of
the ring's roll as two collective-permutes, the wrap-around and the rest, each of the message's
shape). Measured minus predicted is what else permutes: with repeats > 1, the circular schedule's
re-arrangement of the block weights. `--save` writes benchmarks/results/pipeline_attnres_cache_cpu.txt.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks import common  # noqa: E402 - the shared saving helper
from nagjax.config import ModelConfig, PipelineConfig, apply_overrides  # noqa: E402
from nagjax.model import pipeline  # noqa: E402
from nagjax.model.residual.attnres import AttnResCrossStage, n_sources  # noqa: E402
from nagjax.registry import get_experiment, load_experiments  # noqa: E402
from pipeline_child import step_collectives  # noqa: E402 - the compiled step the tests census
BATCH, SEQ, D = 16, 64, 64
STAGES, DATA = 4, 2
# (depth, block_size, repeats): Block AttnRes with N = 9 sources, and Full AttnRes (block_size 1)
ROWS = [(16, 4, 1), (16, 4, 2), (16, 4, 4), (32, 8, 4), (16, 1, 2), (16, 1, 4)]


def census(depth: int, block: int, repeats: int, cache: bool) -> dict:
    cfg = apply_overrides(get_experiment("quickstart"), [
        "model.residual=attnres", f"model.d_model={D}", f"model.depth={depth}", "model.n_heads=4", f"model.d_ff={4 * D}",
        "model.vocab_size=512", f"model.attnres.block_size={block}", f"data.batch_size={BATCH}",
        f"data.seq_len={SEQ}", f"mesh.stage={STAGES}", f"mesh.data={DATA}", f"pipeline.repeats={repeats}",
        f"pipeline.microbatches={STAGES}", f"pipeline.cross_stage_cache={str(cache).lower()}"])
    return {"census": step_collectives(cfg)["collective-permute"], "model": cfg.model, "pipeline": cfg.pipeline}


def predicted(model: ModelConfig, pipe: PipelineConfig, slots: int) -> float:
    sched = pipeline.schedule(model, pipe, STAGES)
    rows = BATCH // sched.microbatches // DATA
    message = (slots * rows * SEQ * D + n_sources(model) * rows * SEQ) * 4
    return 3 * sched.iterations * message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    load_experiments()
    lines = [f"# compiled for 8 CPU devices: {STAGES} stages x {DATA} data, {STAGES} microbatches, batch {BATCH} x "
             f"{SEQ}, d={D}, float32",
             "# slots per microbatch over its p*v hops: whole = p v N, cached = sum of the windows; KiB = "
             "collective-permute KiB per device and step (measured / predicted)",
             f"{'depth':>5} {'S':>3} {'v':>2} {'N':>3} {'W':>3} {'slots whole':>11} {'slots cached':>12} "
             f"{'KiB whole':>17} {'KiB cached':>17} {'cached/whole':>12}"]
    for depth, block, repeats in ROWS:
        whole, cached = census(depth, block, repeats, False), census(depth, block, repeats, True)
        model, pipe = cached["model"], cached["pipeline"]
        sched = pipeline.schedule(model, pipe, STAGES)
        cross = AttnResCrossStage(model, sched)
        n, w = cross.sources, cross.width
        hops = sched.pieces  # a microbatch enters each piece once
        measured_w, measured_c = whole["census"]["bytes"] / 1024, cached["census"]["bytes"] / 1024
        lines.append(
            f"{depth:>5} {block:>3} {repeats:>2} {n:>3} {w:>3} {hops * n:>11} {hops * w:>12} "
            f"{measured_w:>8.0f} / {predicted(model, pipe, n) / 1024:<6.0f} "
            f"{measured_c:>8.0f} / {predicted(model, pipe, w) / 1024:<6.0f} {measured_c / measured_w:>12.2f}")
    print("\n".join(lines))
    if args.save:
        common.save("pipeline_attnres_cache", lines, command=common.command_line("pipeline_attnres_cache.py"))


if __name__ == "__main__":
    main()
