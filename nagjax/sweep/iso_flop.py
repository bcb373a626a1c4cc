"""Sweeps that compare variants fairly: iso-FLOP budgets, learning-rate grids and seeds.

Iso-FLOP (docs/methods.md §6): a sweep fixes a budget C in FLOPs; variant v trains on
D_v = C / F_v tokens, where F_v is its training FLOPs per token as counted by `flops` (executed work
only), so a Mixture-of-Depths variant that skips more depth trains on more tokens. Parameter count
and KV budget stay fixed; each run's learning-rate schedule spans its own step count.

Fairness: every variant is trained at each learning rate of its grid (`Variant.lrs`, else the
sweep's `lrs`, else its config's `optim.lr`) and with `seeds` seeds (seed s shifts both the model
initialisation `train.seed` and the data order `data.shuffle_seed` by s). A variant is reported at
its best learning rate (lowest mean validation loss over seeds) as mean +- std over seeds; every
run is kept in `results.json`. Validation losses are causal (`Trainer.evaluate`).

Runs train one after another under `workdir/<variant>/lr<lr>-s<seed>`; a run with a `result.json`
is done and skipped, an unfinished one resumes from its checkpoint. At the end the sweep writes
`results.json`, `results.md` and plots (`nagjax.sweep.report`). Depth sweeps
(`nagjax/sweep/depth.py`) plan differently and share the runner and the summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from nagjax import flops
from nagjax.config import Config, ConfigError, apply_overrides
from nagjax.interrupts import Interrupted
from nagjax.sweep.report import write_sweep_outputs
from nagjax.train.checkpoint import write_json_atomic
from nagjax.train.guard import TrainingDiverged
from nagjax.train.logging import read_metrics
from nagjax.train.trainer import resolve as resolve_config
from nagjax.train.trainer import train

# What a Mixture-of-Depths run's evaluation adds besides its causal loss (`Trainer.evaluate`).
MOD_DIAGNOSTICS = ("loss_topk", "skip_rate", "forward_flops_per_token")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()  # dotted key=value, applied to the sweep's base config
    lrs: tuple[float, ...] = ()  # this variant's learning-rate grid (default: the sweep's)


@dataclass(frozen=True)
class IsoFlopSweep:
    base: Config
    budget_flops: float
    variants: tuple[Variant, ...]
    evals_per_run: int = 5  # evaluation points along each run (for the loss-vs-FLOPs curves)
    description: str = ""
    lrs: tuple[float, ...] = ()  # learning-rate grid of every variant without its own
    seeds: int = 1


@dataclass
class PlannedRun:
    variant: str
    lr: float
    seed: int
    config: Config
    flops_per_token: float

    @property
    def name(self) -> str:
        """Its folder below the sweep's workdir."""
        return f"{self.variant}/lr{self.lr:g}-s{self.seed}"

    @property
    def tokens(self) -> int:
        return self.config.train.steps * self.config.data.batch_size * self.config.data.seq_len

    @property
    def total_flops(self) -> float:
        return self.tokens * self.flops_per_token


def grid(variant: str, config: Config, lrs: tuple[float, ...], seeds: int) -> list[tuple[str, float, int, Config]]:
    """(variant, lr, seed, config) for every learning rate x seed of one variant."""
    out = []
    for lr in lrs or (config.optim.lr,):
        for seed in range(seeds):
            cfg = config.replace(
                name=f"{variant}_lr{lr:g}_s{seed}",
                optim=dataclasses.replace(config.optim, lr=lr),
                train=dataclasses.replace(config.train, seed=config.train.seed + seed),
                data=dataclasses.replace(config.data, shuffle_seed=config.data.shuffle_seed + seed))
            out.append((variant, lr, seed, cfg.validate()))
    return out


def plan(sweep: IsoFlopSweep, overrides: tuple[str, ...] = (), resolve=None) -> list[PlannedRun]:
    """Every run of the sweep, with `train.steps` set so that steps x tokens/step x F = budget
    (rounded to the nearest step). `resolve` fills derived fields (the tokeniser's vocabulary)."""
    resolve = resolve_config if resolve is None else resolve
    runs = []
    for variant in sweep.variants:
        cfg = resolve(apply_overrides(sweep.base, [*variant.overrides, *overrides]))
        per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        steps = max(1, round(flops.tokens_for_budget(sweep.budget_flops, per_token) / tokens_per_step))
        every = max(1, math.ceil(steps / sweep.evals_per_run))
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=steps, eval_every=every, checkpoint_every=every))
        for name, lr, seed, run_cfg in grid(variant.name, cfg, variant.lrs or sweep.lrs, sweep.seeds):
            runs.append(PlannedRun(name, lr, seed, run_cfg, per_token))
    return runs


def _eval_curve(workdir: Path) -> list[tuple[int, float]]:
    records = read_metrics(workdir / "logs" / "metrics.jsonl")
    return [(s, r["eval/loss"]) for s, r in sorted(records.items()) if "eval/loss" in r]


def run_result(run: PlannedRun, out, workdir: Path) -> dict:
    """One finished run's record: what it was, what it spent and its (causal) evaluation."""
    cfg = run.config
    ev = (out.eval if out is not None else None) or {}
    return {
        "variant": run.variant, "lr": run.lr, "seed": run.seed, "residual": cfg.model.residual,
        "depth": cfg.model.depth, "mod_rate": cfg.mod.rate, "steps": cfg.train.steps, "tokens": run.tokens,
        "flops_per_token": run.flops_per_token, "total_flops": run.total_flops,
        "val_loss": None if out is None else out.val_loss, "val_bpb": None if out is None else out.val_bpb,
        **{k: ev[k] for k in MOD_DIAGNOSTICS if k in ev},
        "curve": [(s, loss, s * cfg.data.batch_size * cfg.data.seq_len * run.flops_per_token)
                  for s, loss in _eval_curve(workdir / run.name)],
    }


def train_run(run: PlannedRun, workdir: Path, label: str = "sweep") -> dict:
    """Train one run under `workdir/<run.name>` and return its record; a run whose `result.json`
    exists is done and only read back, an unfinished one resumes from its checkpoint."""
    if "jsonl" not in run.config.train.logger_list:
        raise ConfigError(f"train.loggers={run.config.train.loggers!r}: sweeps read logs/metrics.jsonl; "
                          "keep jsonl in the list (e.g. train.loggers=tensorboard,jsonl,wandb)")
    done = workdir / run.name / "result.json"
    if done.exists():
        print(f"[{label}] {run.name}: done, skipping", flush=True)
        return json.loads(done.read_text())
    try:
        out = train(run.config, workdir / run.name)
    except Interrupted as e:
        raise e.adding(f"rerun the {label} to resume run {run.name}") from None
    except TrainingDiverged as e:  # too high a learning rate is a result of the grid, not a failure
        print(f"[{label}] {run.name}: diverged ({e})", flush=True)
        result = {**run_result(run, None, workdir), "val_loss": math.inf, "val_bpb": math.inf, "diverged": str(e)}
        write_json_atomic(done, result)
        return result
    result = run_result(run, out, workdir)
    write_json_atomic(done, result)
    return result


def summarise(runs: list[dict]) -> list[dict]:
    """Per variant (in order of appearance): each learning rate's mean +- std over seeds, and the
    variant at its best learning rate (lowest mean validation loss; a learning rate with a diverged
    or non-finite run never wins while another is finite). `best_lr_at_edge` flags a best learning
    rate at either end of a grid of several: the grid may not bracket the optimum."""
    by_variant: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {}).setdefault(r["lr"], []).append(r)
    out = []
    for variant, by_lr in by_variant.items():
        stats = {lr: _mean_std([r["val_loss"] for r in rs]) for lr, rs in by_lr.items()}
        best = min(stats, key=lambda lr: stats[lr][0] if math.isfinite(stats[lr][0]) else math.inf)
        rows = by_lr[best]
        first = rows[0]
        summary = {
            "variant": variant, "residual": first["residual"], "depth": first["depth"],
            "mod_rate": first["mod_rate"], "tokens": first["tokens"], "flops_per_token": first["flops_per_token"],
            "best_lr": best, "best_lr_at_edge": len(by_lr) > 1 and best in (min(by_lr), max(by_lr)),
            "seeds": len(rows), "val_loss": stats[best][0], "val_loss_std": stats[best][1],
            "val_bpb": _mean_std([r["val_bpb"] for r in rows])[0],
            "by_lr": {f"{lr:g}": {"mean": m, "std": s, "seeds": len(by_lr[lr])} for lr, (m, s) in stats.items()},
        }
        for key in MOD_DIAGNOSTICS:
            if all(key in r for r in rows):
                summary[key] = _mean_std([r[key] for r in rows])[0]
        out.append(summary)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [math.inf if v is None or not math.isfinite(v) else v for v in values]
    if not all(map(math.isfinite, values)):
        return math.inf, math.inf
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_sweep(sweep: IsoFlopSweep, workdir: str | Path, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Train every run of an iso-FLOP sweep; returns the per-variant summaries."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = plan(sweep, overrides)
    print(f"[sweep] budget {sweep.budget_flops:.3g} FLOPs, {len(runs)} runs -> {workdir}")
    for run in runs:
        print(f"[sweep]   {run.name:<28} {run.flops_per_token / 1e6:9.2f} MFLOP/token  "
              f"{run.config.train.steps:6d} steps  {run.tokens:,} tokens")
    results = [train_run(run, workdir) for run in runs]
    variants = summarise(results)
    write_sweep_outputs({"kind": "iso_flop", "description": sweep.description, "budget_flops": sweep.budget_flops,
                         "seeds": sweep.seeds, "variants": variants, "runs": results}, workdir)
    return variants
