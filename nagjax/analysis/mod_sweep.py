"""Post-training accuracy/compute trade-off of router-free Mixture-of-Depths (docs/methods.md §2.3).

A trained model with a skip signal (NAG) is evaluated with causal thresholds ("execute sublayer l
iff m_l >= tau_l") at a range of target skip rates, with no retraining. Thresholds come from a dense
calibration pass (`nagjax.infer.calibration.calibrate_thresholds`: tau_l = the rate-quantile of
m_l over the calibration tokens); the realised skip rate of each sublayer is measured, and executed
forward FLOPs per token are counted from it. A model trained with MoD also gets its own trained
thresholds (EMA from training) as the `trained` point. Which points and routings: the model's
`MoDPolicy` (`sweep_targets`, `sweep_routing`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax import flops
from nagjax.infer.calibration import calibrate_thresholds
from nagjax.model.residual.base import StepContext
from nagjax.train.loss import cross_entropy

DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@functools.lru_cache(maxsize=8)
def threshold_eval_fn(graphdef):
    """jit: (params, batch, tau [depth, 2]) -> loss sum, token count, per-sublayer statistics."""

    def run(params, batch, tau):
        model = nnx.merge(graphdef, params)
        logits, stats = model(batch["inputs"], ctx=StepContext(routing=model.mod_policy.sweep_routing(tau)))
        losses = cross_entropy(logits, batch["targets"])
        keep = ("skip_rate", "skip_by_position", "gate_mean")
        return jnp.sum(losses), losses.size, {k: stats[k] for k in keep}

    return jax.jit(run)


def _evaluate(fn, params, batches, tau) -> dict:
    total, count, stats = 0.0, 0, []
    for batch in batches:
        loss_sum, n, s = fn(params, batch, jnp.asarray(tau, jnp.float32))
        total += float(loss_sum)
        count += int(n)
        stats.append(jax.device_get(s))
    mean = {k: np.mean([s[k] for s in stats], axis=0) for k in stats[0]}
    return {"loss": total / count, **mean}


def mod_sweep(run, batches, *, rates=DEFAULT_RATES) -> dict:
    """Evaluate `run` (analysis.diagnostics.Run of a model with a skip signal) at each target rate."""
    cfg = run.config
    policy = run.model().mod_policy
    policy.require_signal(f"--mod-sweep ({run.workdir})")
    mod = policy.mod  # which sublayers may skip, exempt blocks and the K/V rule; its rate is swept
    seq_len = cfg.data.seq_len
    rates = tuple(float(r) for r in rates)
    quantiles = calibrate_thresholds(run.graphdef, run.params, batches, rates)  # [depth, 2, R]
    evaluate = threshold_eval_fn(run.graphdef)
    dense_fwd = flops.forward_breakdown(cfg.model, seq_len).forward
    points = []
    for label, rate, tau in policy.sweep_targets(rates, quantiles, run.state["aux"]):
        out = _evaluate(evaluate, run.params, batches, tau)
        executed = 1.0 - out["skip_rate"]
        fwd = flops.forward_breakdown(cfg.model, seq_len, mod=mod, executed=executed).forward
        eligible = executed < 1.0 if rate > 0 else np.zeros_like(executed, bool)
        points.append({
            "label": label,
            "target_rate": rate,
            "realised_rate": float(out["skip_rate"].mean()),
            "realised_rate_eligible": float(out["skip_rate"][eligible].mean()) if eligible.any() else 0.0,
            "val_loss": out["loss"],
            "forward_flops_per_token": fwd,
            "forward_flops_fraction": fwd / dense_fwd,
            "skip_rate": out["skip_rate"].tolist(),  # [depth, 2]
            "gate_mean": out["gate_mean"].tolist(),
            "skip_by_position": out["skip_by_position"].tolist(),  # [depth, 2, t]
            "thresholds": np.asarray(tau).tolist(),
        })
    return {"workdir": str(run.workdir), "step": run.step, "mod": vars(mod) if hasattr(mod, "__dict__") else str(mod),
            "dense_forward_flops_per_token": dense_fwd, "points": points}


def write_outputs(result: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mod_sweep.json").write_text(json.dumps(result, indent=2))
    lines = ["| point | target rate | realised rate (all / skipping sublayers) | val loss | "
             "forward MFLOP/token | of dense |", "|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['label']} | {p['target_rate']:.3f} | {p['realised_rate']:.3f} / "
                     f"{p['realised_rate_eligible']:.3f} | {p['val_loss']:.4f} | "
                     f"{p['forward_flops_per_token'] / 1e6:.3f} | {p['forward_flops_fraction']:.3f} |")
    (out_dir / "mod_sweep.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = [p for p in result["points"] if p["label"] != "trained"]
    ax.plot([p["forward_flops_per_token"] / 1e6 for p in pts], [p["val_loss"] for p in pts], "o-",
            label="threshold sweep")
    for p in pts:
        ax.annotate(f"{p['realised_rate']:.2f}", (p["forward_flops_per_token"] / 1e6, p["val_loss"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for p in result["points"]:
        if p["label"] == "trained":
            ax.plot([p["forward_flops_per_token"] / 1e6], [p["val_loss"]], "r*", ms=12,
                    label="trained thresholds")
    ax.set_xlabel("executed forward MFLOP per token")
    ax.set_ylabel("validation loss")
    ax.set_title("MoD accuracy / compute (labels: realised skip rate)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "mod_sweep.png", dpi=120)
    plt.close(fig)

    heat = [p for p in result["points"] if p["target_rate"] > 0]
    if heat:
        cols = min(4, len(heat))
        rows = -(-len(heat) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.0, 2.8 * rows), squeeze=False,
                                 sharey=True, constrained_layout=True)
        for ax, p in zip(axes.ravel(), heat):
            grid = np.asarray(p["skip_by_position"])  # [depth, 2, t]
            grid = grid.reshape(-1, grid.shape[-1])  # rows: sublayers in order (attn, mlp per block)
            im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
            ax.set_title(f"{p['label']}: skips {p['realised_rate_eligible']:.2f}", fontsize=9)
            ax.set_xlabel("position")
        for ax in axes[:, 0]:
            ax.set_ylabel("sublayer (attn, mlp / block)")
        for ax in axes.ravel()[len(heat):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes.ravel().tolist(), label="skip rate", shrink=0.9)
        fig.suptitle("Mixture-of-Depths skip rate by sublayer and position", fontsize=10)
        fig.savefig(out_dir / "skip_heatmap.png", dpi=110)
        plt.close(fig)
