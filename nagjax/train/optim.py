"""AdamW with warm-up + cosine decay, gradient clipping and SPEC 1 parameter groups.

Groups, decided from each parameter's name and logical axes (not its stacked shape):
  * `matrix`: weight matrices (>= 2 logical axes): AdamW with weight decay;
  * `vector`: norm gains and other scalars (e.g. NAG's decode log-gain): no weight decay;
  * `nag`: NAG scalars and modulator (alpha, beta, W, b, p, g_enc): no weight decay and a learning
    rate `optim.nag_lr_ratio` times the matrix rate.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from nagjax.config import OptimConfig
from nagjax.model.residual.nag import NAG_PARAM_NAMES

GROUPS = ("matrix", "vector", "nag")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _group(path: tuple, variable: nnx.Variable) -> str:
    names = [str(getattr(p, "key", p)) for p in path]
    if any(name in NAG_PARAM_NAMES for name in names):
        return "nag"
    axes = getattr(variable, "logical_axes", ())
    return "matrix" if len(axes) >= 2 else "vector"


def param_groups(params: nnx.State) -> nnx.State:
    """A pytree like `params` whose leaves are group names."""
    return jax.tree.map_with_path(
        _group, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)

    def adamw(scale: float, decay: float):
        return optax.adamw(
            lambda step: lr(step) * scale, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=decay
        )

    per_group = {
        "matrix": adamw(1.0, cfg.weight_decay),
        "vector": adamw(1.0, 0.0),
        "nag": adamw(cfg.nag_lr_ratio, 0.0),
    }
    labels = param_groups(params)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*chain, optax.multi_transform(per_group, labels))
