"""PNG plots of the depth microscope (matplotlib, Agg backend) and `nagjax analyze`.

One figure per quantity; the runs passed together (e.g. Pre-LN and NAG) overlay on one axis.
Sublayer quantities are drawn against the sublayer number (1..2L, attention odd, MLP even),
block quantities against the block's original index. Besides the quantities every scheme has,
each registered scheme's own (`Scheme.microscope`: NAG's gain, gate and alpha; AttnRes's mixing
weights as a heat map per run) are plotted from its registry entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nagjax.analysis import diagnostics as diag
from nagjax.model.residual import SCHEMES

SUBLAYER_PLOTS = (  # every scheme's
    ("stream_rms", "residual-stream RMS (NAG: exp of the norm lane)", True),
    ("update_ratio", "relative update ||delta R|| / ||R||", True),
    ("cosine", "cos(R before, R after) of each sublayer", False),
)
BLOCK_PLOTS = (
    ("grad_norm_sum", "accumulated gradient norm (CascadeFlow score)", True),
    ("skip_loss_increase", "validation-loss increase when the block is skipped", False),
    ("block_influence", "block influence 1 - cos(h_in, h_out)", True),
    ("weight_magnitude", "block weight RMS", False),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(m: dict) -> str:
    return f"{m['residual']}" + (f"+{m['taper']}" if m.get("taper", "none") != "none" else "") + f" ({m['name']})"


def plot_all(micros: list[dict], out_dir: str | Path) -> list[Path]:
    """Write one PNG per quantity (and an AttnRes mixing heat map per AttnRes run)."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    own = {name: s for scheme in SCHEMES.values() for name, s in scheme.microscope.items()}
    lines = [*SUBLAYER_PLOTS, *((name, s.title, s.log) for name, s in own.items() if not s.heatmap)]
    for key, title, log in lines:
        runs = [m for m in micros if key in m["sublayers"]]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m in runs:
            ids = np.asarray(m.get("positions", m["block_ids"]))  # executed blocks of a looped stack
            x = np.stack([2 * ids + 1, 2 * ids + 2], axis=1).reshape(-1)
            ax.plot(x, np.asarray(m["sublayers"][key]).reshape(-1), marker="o", ms=3, label=_label(m))
        ax.set_xlabel("sublayer (odd: attention, even: MLP)"
                      + ("; executed order of the looped stack" if any(m.get("repeat", 1) > 1 for m in runs) else ""))
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, key)

    for key, title, log in BLOCK_PLOTS:
        runs = [m for m in micros if key in m["blocks"]]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        width = 0.8 / len(runs)
        for j, m in enumerate(runs):
            # per executed block (block influence, skip loss) or per block (weights, gradients)
            positions = m.get("positions", m["block_ids"])
            ids = np.asarray(positions if len(m["blocks"][key]) == len(positions) else m["block_ids"], float)
            ax.bar(ids + (j - (len(runs) - 1) / 2) * width, m["blocks"][key], width=width, label=_label(m))
        ax.set_xlabel("block (looped stacks: executed block for influence and skip loss)")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        save(fig, key)

    looped = [m for m in micros if m.get("repeat", 1) > 1]
    for key, title in (("update_ratio", "mean relative update per pass of the looped stack"),
                       ("skip_rate", "MoD skip rate per pass (trained thresholds)")):
        runs = [m for m in looped if key in m["passes"][0]]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m in runs:
            ax.plot([p["pass"] for p in m["passes"]], [p[key] for p in m["passes"]], marker="o", label=_label(m))
        ax.set_xlabel("pass")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, f"passes_{key}")

    for key, s in own.items():
        if not s.heatmap:
            continue
        for m in micros:
            if key not in m["sublayers"]:
                continue
            w = np.asarray(m["sublayers"][key])  # [depth, 2, N]
            w = w.reshape(-1, w.shape[-1])
            fig, ax = plt.subplots(figsize=(6.4, 4.8))
            im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=min(0.0, float(w.min())),
                           vmax=max(float(w.max()), 1e-6))
            ax.set_xlabel("entry")
            ax.set_ylabel("sublayer (0-based)")
            ax.set_title(f"{s.title}: {_label(m)}", fontsize=9)
            fig.colorbar(im, ax=ax)
            save(fig, f"{key}_{m['name']}")
    return written


def analyze(workdirs: list[str | Path], out_dir: str | Path, *, eval_batches: int | None = None,
            skip_losses: bool = True) -> dict:
    """Microscope every workdir on the same validation batches, write `depth.json` and PNGs."""
    micros = []
    batches = None
    for wd in workdirs:
        run = diag.load_run(wd)
        if batches is None:
            batches = diag.validation_batches(run.config, eval_batches or min(run.config.train.eval_batches, 8))
        micros.append(diag.microscope(run, batches, skip_losses=skip_losses))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "depth.json").write_text(json.dumps({"runs": micros}, indent=1))
    images = plot_all(micros, out_dir)
    return {"json": str(out_dir / "depth.json"), "images": [str(p) for p in images], "runs": micros}
