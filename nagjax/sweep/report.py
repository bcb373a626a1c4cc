"""Sweep results as tables and plots: each sweep's own folder, and the results page.

`write_sweep_outputs(results, workdir)` writes a finished sweep's `results.json` (every run and the
per-variant summaries of `nagjax.sweep.iso_flop.summarise`), `results.md` and its plots: iso-FLOP sweeps
`loss_vs_rate.png` and `loss_vs_flops.png`, depth sweeps `loss_vs_depth.png`, with error bars of
one standard deviation over seeds at each variant's best learning rate.

`build_report(sweep_dirs, out_md)` (`nagjax report --sweep-dir DIR ... --out docs/results.md`)
collects several sweeps into one Markdown page, copying their plots next to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from nagjax.train.trainer import run_info

PLOTS = {"iso_flop": ("loss_vs_rate.png", "loss_vs_flops.png"), "depth": ("loss_vs_depth.png",)}


def _loss(v: dict) -> str:
    if v["val_loss"] == float("inf"):
        return "diverged"
    spread = f" ± {v['val_loss_std']:.4f}" if v["seeds"] > 1 else ""
    return f"{v['val_loss']:.4f}{spread}"


def _lr(v: dict) -> str:
    return f"{v['best_lr']:g}" + (" †" if v.get("best_lr_at_edge") else "")


def _opt(v: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return fmt.format(v[key] / scale) if key in v else "-"


def tables(results: dict) -> str:
    """The Markdown tables of one sweep: variants at their best learning rate, then every
    learning rate (mean ± std over seeds)."""
    variants, seeds = results["variants"], results.get("seeds", 1)
    if results["kind"] == "iso_flop":
        lines = [f"Iso-FLOP sweep: {results['budget_flops']:.3g} training FLOPs per run, {seeds} seed(s) per "
                 "learning rate; validation losses are causal (MoD: its trained thresholds; the top-k loss "
                 "routes over whole sequences, a non-causal diagnostic).", "",
                 "| variant | residual | MoD rate | MFLOP/token | tokens | best LR | val loss | bits/byte | "
                 "top-k loss | eval skip rate | eval fwd MFLOP/token |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in variants:
            lines.append(
                f"| {v['variant']} | {v['residual']} | {v['mod_rate']:.3f} | {v['flops_per_token'] / 1e6:.2f} | "
                f"{v['tokens']:,} | {_lr(v)} | {_loss(v)} | {v['val_bpb']:.4f} | "
                f"{_opt(v, 'loss_topk', '{:.4f}')} | {_opt(v, 'skip_rate', '{:.3f}')} | "
                f"{_opt(v, 'forward_flops_per_token', '{:.2f}', 1e6)} |")
    else:
        lines = [f"Depth sweep: {results['tokens']:,} training tokens per run, {seeds} seed(s) per learning "
                 "rate; causal validation losses.", "",
                 "| variant | scheme | depth | best LR | val loss | bits/byte |", "|---|---|---:|---|---:|---:|"]
        for v in variants:
            lines.append(f"| {v['variant']} | {v['residual']} | {v['depth']} | {_lr(v)} | {_loss(v)} | "
                         f"{v['val_bpb']:.4f} |")
    if any(v.get("best_lr_at_edge") for v in variants):
        lines += ["", "† the best learning rate is at an end of its grid: the optimum may lie beyond it."]
    lrs = sorted({float(lr) for v in variants for lr in v["by_lr"]})
    if len(lrs) > 1:
        lines += ["", "Every learning rate (validation loss, mean ± std over seeds; best in bold):", "",
                  "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for v in variants:
            cells = []
            for lr in lrs:
                cell = v["by_lr"].get(f"{lr:g}")
                text = ("-" if cell is None else "diverged" if cell["mean"] == float("inf")
                        else f"{cell['mean']:.4f} ± {cell['std']:.4f}")
                cells.append(f"**{text}**" if cell is not None and lr == v["best_lr"] else text)
            lines.append(f"| {v['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_runs(results: dict, variant: dict) -> list[dict]:
    return [r for r in results["runs"] if r["variant"] == variant["variant"] and r["lr"] == variant["best_lr"]]


def plot(results: dict, out_dir: Path) -> list[Path]:
    """The sweep's plots (see the module docstring); error bars: one std over seeds."""
    plt = _plt()
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    variants = results["variants"]
    by_scheme: dict[str, list[dict]] = {}
    for v in variants:
        by_scheme.setdefault(v["residual"], []).append(v)
    if results["kind"] == "depth":
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for scheme, rows in by_scheme.items():
            rows = sorted(rows, key=lambda v: v["depth"])
            ax.errorbar([v["depth"] for v in rows], [v["val_loss"] for v in rows],
                        yerr=[v["val_loss_std"] for v in rows], marker="o", capsize=3, label=scheme)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("blocks (fixed width, fixed tokens)")
        ax.set_ylabel("validation loss (best LR, mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss_vs_depth.png")
        return written

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for scheme, rows in by_scheme.items():
        if len({v["mod_rate"] for v in rows}) > 1:  # a scheme swept over skip rates: one curve
            rows = sorted(rows, key=lambda v: v["mod_rate"])
            ax.errorbar([v["mod_rate"] for v in rows], [v["val_loss"] for v in rows],
                        yerr=[v["val_loss_std"] for v in rows], marker="o", capsize=3, label=f"{scheme} (+MoD)")
        else:  # a dense baseline: a reference line with its spread
            for v in rows:
                line = ax.axhline(v["val_loss"], ls="--", color="gray", label=f"{v['variant']} ({scheme})")
                if v["val_loss_std"]:
                    ax.axhspan(v["val_loss"] - v["val_loss_std"], v["val_loss"] + v["val_loss_std"],
                               color=line.get_color(), alpha=0.15)
    ax.set_xlabel("MoD skip rate r")
    ax.set_ylabel("final validation loss (best LR, mean ± std)")
    ax.set_title("Iso-FLOP: final loss vs skip rate")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_rate.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in variants:
        curves = [r["curve"] for r in _best_runs(results, v) if r["curve"]]
        n = min((len(c) for c in curves), default=0)
        if n:
            points = np.asarray([c[:n] for c in curves], float)  # [seeds, n, (step, loss, flops)]
            ax.errorbar(points[0, :, 2], points[:, :, 1].mean(0), yerr=points[:, :, 1].std(0), marker="o",
                        ms=3, capsize=2, label=v["variant"])
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss vs compute (best LR)")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_flops.png")
    return written


def write_sweep_outputs(results: dict, workdir: Path) -> None:
    """results.json (with the run environment), results.md and the plots of a finished sweep."""
    workdir = Path(workdir)
    results = {**results, "run_info": run_info()}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "results.md").write_text(tables(results))
    plot(results, workdir)


def build_report(sweep_dirs: list[str | Path], out_md: str | Path, title: str = "nagjax results",
                 notes: list[str] = ()) -> Path:
    """One Markdown page from finished sweeps: per sweep its description, environment, tables and
    plots (copied into `<out_md's folder>/results/<sweep folder name>/`), then `notes`."""
    out_md = Path(out_md)
    assets = out_md.parent / "results"
    sections = [f"# {title}", "", "Generated by `nagjax report` from the sweeps' `results.json`; "
                "rerun it after a sweep to refresh this page.", ""]
    names = []
    for sweep_dir in map(Path, sweep_dirs):
        path = sweep_dir / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the sweep first (`nagjax sweep --workdir {sweep_dir}`)")
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or "kind" not in results:
            raise ValueError(f"{path} was written by an older nagjax (no learning-rate grids or seeds); "
                             f"rerun the sweep into a new --workdir")
        info = results.get("run_info", {})
        name = sweep_dir.name if sweep_dir.name not in names else f"{sweep_dir.parent.name}-{sweep_dir.name}"
        names.append(name)
        target = assets / name
        target.mkdir(parents=True, exist_ok=True)
        sections += [f"## {name}", "", results.get("description", "") or "", "",
                     f"Ran on {info.get('device_count', '?')} x {info.get('device_kind', '?')} "
                     f"(jax {info.get('jax_version', '?')}, git {str(info.get('git_revision'))[:10]}).", "",
                     tables(results)]
        for name in PLOTS[results["kind"]]:
            if (sweep_dir / name).exists():
                shutil.copyfile(sweep_dir / name, target / name)
                sections += [f"![{name}]({target.relative_to(out_md.parent).as_posix()}/{name})", ""]
    for note in notes:
        sections += [note, ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(sections) + "\n")
    return out_md
