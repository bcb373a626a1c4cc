"""Iso-FLOP sweeps (docs/methods.md §6): every variant gets the same training compute.

A sweep fixes a budget C in FLOPs; variant v trains on D_v = C / F_v tokens, where F_v is its
training FLOPs per token as counted by `flops` (executed work only), so a Mixture-of-Depths
variant that skips more depth trains on more tokens. Parameter count and KV budget stay fixed;
each variant's learning-rate schedule spans its own step count.

`run_sweep` trains the variants one after another under `workdir/<variant>`; a variant with a
`result.json` is done and skipped, an unfinished one resumes from its checkpoint. At the end it
writes `results.json`, `results.md` and PNG plots into `workdir`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from nagjax import flops
from nagjax.config import Config, ConfigError, apply_overrides


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()  # dotted key=value, applied to the sweep's base config


@dataclass(frozen=True)
class IsoFlopSweep:
    base: Config
    budget_flops: float
    variants: tuple[Variant, ...]
    evals_per_run: int = 5  # evaluation points along each run (for the loss-vs-FLOPs curves)
    description: str = ""


@dataclass
class PlannedRun:
    variant: Variant
    config: Config
    flops_per_token: float
    tokens_per_step: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def total_flops(self) -> float:
        return self.tokens * self.flops_per_token


def plan(sweep: IsoFlopSweep, overrides: tuple[str, ...] = (), resolve=None) -> list[PlannedRun]:
    """Each variant's config with `train.steps` set so that steps x tokens/step x F = budget
    (rounded to the nearest step). `resolve` fills derived fields (the tokeniser's vocabulary)."""
    if resolve is None:
        from nagjax.train.trainer import resolve
    runs = []
    for variant in sweep.variants:
        cfg = apply_overrides(sweep.base, [*variant.overrides, *overrides])
        cfg = resolve(cfg.replace(name=variant.name))
        per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        steps = max(1, round(flops.tokens_for_budget(sweep.budget_flops, per_token) / tokens_per_step))
        every = max(1, math.ceil(steps / sweep.evals_per_run))
        train = dataclasses.replace(cfg.train, steps=steps, eval_every=every, checkpoint_every=every)
        runs.append(PlannedRun(variant, cfg.replace(train=train), per_token, tokens_per_step, steps))
    return runs


def _eval_curve(workdir: Path) -> list[tuple[int, float]]:
    from nagjax.train.logging import read_metrics

    records = read_metrics(workdir / "logs" / "metrics.jsonl")
    return [(s, r["eval/loss"]) for s, r in sorted(records.items()) if "eval/loss" in r]


def train_variant(name: str, config: Config, workdir: Path, summarise, label: str = "sweep") -> dict:
    """Train one variant under `workdir/name` and return its result; a variant whose
    `result.json` exists is done and only read back, an unfinished one resumes from its checkpoint.
    `summarise(run_result)` gives the result dict, written atomically as the done-marker."""
    from nagjax.train.checkpoint import write_json_atomic
    from nagjax.train.trainer import train

    if "jsonl" not in config.train.logger_list:
        raise ConfigError(f"train.loggers={config.train.loggers!r}: sweeps read logs/metrics.jsonl; "
                          "keep jsonl in the list (e.g. train.loggers=tensorboard,jsonl,wandb)")
    done = workdir / name / "result.json"
    if done.exists():
        print(f"[{label}] {name}: done, skipping", flush=True)
        return json.loads(done.read_text())
    out = train(config, workdir / name)
    if out.interrupted:
        raise KeyboardInterrupt(f"{label} interrupted in {name}; rerun to resume")
    result = summarise(out)
    write_json_atomic(done, result)
    return result


def run_sweep(sweep: IsoFlopSweep, workdir: str | Path, overrides: tuple[str, ...] = ()) -> list[dict]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = plan(sweep, overrides)
    print(f"[sweep] budget {sweep.budget_flops:.3g} FLOPs, {len(runs)} variants -> {workdir}")
    for run in runs:
        print(f"[sweep]   {run.variant.name:<16} {run.flops_per_token / 1e6:9.2f} MFLOP/token  "
              f"{run.steps:6d} steps  {run.tokens:,} tokens")
    results = []
    for run in runs:
        vdir = workdir / run.variant.name
        summarise = lambda out, run=run, vdir=vdir: {
            "variant": run.variant.name,
            "residual": run.config.model.residual,
            "mod_rate": run.config.mod.rate,
            "steps": run.steps,
            "tokens": run.tokens,
            "flops_per_token": run.flops_per_token,
            "total_flops": run.total_flops,
            "val_loss": out.val_loss,
            "val_bpb": out.val_bpb,
            "curve": [(s, loss, s * run.tokens_per_step * run.flops_per_token) for s, loss in _eval_curve(vdir)],
        }
        results.append(train_variant(run.variant.name, run.config, workdir, summarise))
    write_report(sweep, results, workdir)
    return results


def write_report(sweep: IsoFlopSweep, results: list[dict], workdir: Path) -> None:
    (workdir / "results.json").write_text(json.dumps(
        {"budget_flops": sweep.budget_flops, "description": sweep.description, "variants": results}, indent=2))
    lines = [
        f"Iso-FLOP sweep: budget {sweep.budget_flops:.3g} training FLOPs per variant.",
        "",
        "| variant | residual | MoD rate | MFLOP/token | steps | tokens | val loss | bits/byte |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['residual']} | {r['mod_rate']:.3f} | {r['flops_per_token'] / 1e6:.2f} "
            f"| {r['steps']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |"
        )
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    _plot(results, workdir)


def _plot(results: list[dict], workdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    by_scheme: dict[str, list[dict]] = {}
    for r in results:
        by_scheme.setdefault(r["residual"], []).append(r)
    for scheme, rows in by_scheme.items():
        if len({r["mod_rate"] for r in rows}) > 1:  # a scheme swept over skip rates: one curve
            rows = sorted(rows, key=lambda r: r["mod_rate"])
            ax.plot([r["mod_rate"] for r in rows], [r["val_loss"] for r in rows], "o-", label=f"{scheme} (+MoD)")
        else:  # a dense baseline: a reference line
            for r in rows:
                ax.axhline(r["val_loss"], ls="--", color="gray", label=f"{r['variant']} ({scheme})")
    ax.set_xlabel("MoD skip rate r")
    ax.set_ylabel("final validation loss")
    ax.set_title("Iso-FLOP: final loss vs skip rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "loss_vs_rate.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in results:
        if r["curve"]:
            _, losses, spent = zip(*r["curve"])
            ax.plot(spent, losses, "o-", label=r["variant"])
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss vs compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "loss_vs_flops.png", dpi=120)
    plt.close(fig)
