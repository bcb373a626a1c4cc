"""Depth sweeps: residual schemes x depth at fixed width and a fixed token budget.

A `DepthSweep` (registered with `nagjax.registry.sweep`, see experiments/depth.py) is a list of
(variant name, Config) pairs and a token budget; every variant trains on the same number of tokens
(`train.steps = tokens / (batch_size * seq_len)`), so deeper models spend more compute: the
question is how each scheme's loss scales with depth, not iso-FLOP efficiency.

    python -m nagjax.analysis.depth_sweep --sweep depth_cpu --workdir runs/depth_cpu

trains the variants one after another under `workdir/<variant>` (a variant with `result.json` is
skipped, an unfinished one resumes from its checkpoint) and writes `results.json`, `results.md`
and `loss_vs_depth.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nagjax.config import Config


@dataclass(frozen=True)
class DepthSweep:
    variants: tuple[tuple[str, Config], ...]
    tokens: int  # training tokens per variant
    description: str = ""

    def planned(self) -> list[tuple[str, Config]]:
        out = []
        for name, cfg in self.variants:
            steps = max(1, self.tokens // (cfg.data.batch_size * cfg.data.seq_len))
            train = dataclasses.replace(cfg.train, steps=steps)
            out.append((name, cfg.replace(name=name, train=train).validate()))
        return out


def run_depth_sweep(sweep: DepthSweep, workdir: str | Path) -> list[dict]:
    from nagjax.sweep import train_variant

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    planned = sweep.planned()
    print(f"[depth-sweep] {len(planned)} variants, {sweep.tokens:,} tokens each -> {workdir}", flush=True)
    results = []
    for name, cfg in planned:
        summarise = lambda out, name=name, cfg=cfg: {
            "variant": name, "residual": cfg.model.residual, "depth": cfg.model.depth,
            "taper": cfg.model.taper, "attnres_block_size": cfg.model.attnres.block_size,
            "steps": cfg.train.steps, "val_loss": out.val_loss, "val_bpb": out.val_bpb}
        results.append(train_variant(name, cfg, workdir, summarise, label="depth-sweep"))
    write_results(results, workdir)
    return results


def write_results(results: list[dict], workdir: Path) -> None:
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| variant | scheme | depth | val loss | bits/byte |", "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['residual']} | {r['depth']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for scheme in dict.fromkeys(r["residual"] for r in results):
        rows = sorted((r for r in results if r["residual"] == scheme), key=lambda r: r["depth"])
        ax.plot([r["depth"] for r in rows], [r["val_loss"] for r in rows], marker="o", label=scheme)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("blocks (fixed width, fixed tokens)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "loss_vs_depth.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from nagjax.registry import get_sweep, load_experiments
    from nagjax.runtime import setup

    p = argparse.ArgumentParser(prog="python -m nagjax.analysis.depth_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", "-s", required=True, help="registered depth sweep (e.g. depth_cpu, depth_h100)")
    p.add_argument("--workdir", "-w", default=None, help="default: runs/sweeps/<sweep>")
    p.add_argument("--experiments-dir", action="append", default=[], metavar="PATH")
    args = p.parse_args(argv)
    setup()
    load_experiments(args.experiments_dir)
    sweep = get_sweep(args.sweep)
    if not isinstance(sweep, DepthSweep):
        p.error(f"{args.sweep!r} is not a depth sweep (use `nagjax sweep` for iso-FLOP sweeps)")
    workdir = Path(args.workdir or Path("runs") / "sweeps" / args.sweep)
    run_depth_sweep(sweep, workdir)
    print((workdir / "results.md").read_text())
    return 0


if __name__ == "__main__":  # run the imported module's main, so DepthSweep is one class
    from nagjax.analysis.depth_sweep import main as _main

    sys.exit(_main())
