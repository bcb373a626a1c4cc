"""Depth sweeps: residual schemes x depth at fixed width and a fixed token budget.

A `DepthSweep` (registered with `nagjax.registry.sweep`, see experiments/depth.py) is a list of
(variant name, Config) pairs and a token budget; every variant trains on the same number of tokens
(`train.steps = tokens / (batch_size * seq_len)`), so deeper models spend more compute: the
question is how each scheme's loss scales with depth, not iso-FLOP efficiency. Like an iso-FLOP
sweep it trains each variant at each learning rate of its grid (`lrs`) with `seeds` seeds and
reports it at its best learning rate as mean +- std (`nagjax.sweep.iso_flop`).

    nagjax sweep --sweep depth_cpu --workdir runs/depth_cpu

trains the runs one after another under `workdir/<variant>/lr<lr>-s<seed>` (a run with
`result.json` is skipped, an unfinished one resumes from its checkpoint) and writes `results.json`,
`results.md` and `loss_vs_depth.png`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from nagjax import flops
from nagjax.config import Config
from nagjax.sweep.iso_flop import PlannedRun, grid, summarise, train_run
from nagjax.sweep.report import write_sweep_outputs
from nagjax.train.trainer import resolve as resolve_config


@dataclass(frozen=True)
class DepthSweep:
    variants: tuple[tuple[str, Config], ...]
    tokens: int  # training tokens per run
    description: str = ""
    lrs: tuple[float, ...] = ()  # learning-rate grid of every variant (default: its optim.lr)
    seeds: int = 1

    def plan(self, resolve=None) -> list:
        """Every run, with `train.steps` set from the token budget. `resolve` fills derived fields
        (the tokeniser's vocabulary; default: the trainer's)."""
        resolve = resolve_config if resolve is None else resolve
        runs = []
        for name, cfg in self.variants:
            steps = max(1, self.tokens // (cfg.data.batch_size * cfg.data.seq_len))
            cfg = resolve(cfg.replace(train=dataclasses.replace(cfg.train, steps=steps)))
            per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
            runs += [PlannedRun(v, lr, seed, c, per_token) for v, lr, seed, c in grid(name, cfg, self.lrs, self.seeds)]
        return runs


def run_depth_sweep(sweep: DepthSweep, workdir: str | Path) -> list[dict]:
    """Train every run of a depth sweep; returns the per-variant summaries."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = sweep.plan()
    print(f"[depth-sweep] {len(runs)} runs, {sweep.tokens:,} tokens each -> {workdir}", flush=True)
    results = [train_run(run, workdir, label="depth-sweep") for run in runs]
    variants = summarise(results)
    write_sweep_outputs({"kind": "depth", "description": sweep.description, "tokens": sweep.tokens,
                         "seeds": sweep.seeds, "variants": variants, "runs": results}, workdir)
    return variants
