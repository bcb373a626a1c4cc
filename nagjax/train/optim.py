"""AdamW with warm-up + cosine decay, gradient clipping, and parameter groups.

Groups, decided from each parameter's *type* and logical axes (never its name or stacked shape):
  * a residual scheme's own groups (`Scheme.param_groups`): every parameter of the group's
    `nnx.Param` subclass, e.g. NAG's `GateParam`s form `nag` (no weight decay, learning rate
    `optim.nag_lr_ratio` x the matrix rate; docs/methods.md §1.6);
  * `matrix`: other weight matrices (>= 2 logical axes): AdamW with weight decay;
  * `vector`: other norm gains and scalars (e.g. NAG's decode log-gain): no weight decay.

`update(grads, state, params, skip=bad)` skips a step inside the optimiser: the moments and counts
stay as they were, and the update is computed from the kept moments. The bad-step guard used to
select the old optimiser state after optax's update instead; XLA then had to copy every moment once
per step (the update and the select both read the old moment while the select overwrote it in
place). The state is optax's own (`ScaleByAdamState`, `ScaleByScheduleState`), so checkpoints are
unchanged, and a good step computes exactly what `optax.adamw` computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from flax import nnx

from nagjax.config import OptimConfig
from nagjax.model.residual import all_param_groups
from nagjax.train.guard import keep_if_bad

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


def applied_updates(opt_state) -> jax.Array:
    """How many updates the optimiser has applied: its schedule's step count, which a skipped step
    does not advance. The learning rate a step applies is `schedule(applied_updates(state before
    the step))`; the global step runs ahead of it by the number of skipped steps (since the
    checkpoint a rollback restored, the skips before it are in neither)."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    if not counts:
        raise ValueError("the optimiser state holds no schedule step count (optax.ScaleByScheduleState)")
    return counts[0]  # every parameter group's chain counts the same updates


def keep_if(skip, old, new):
    """`new`, or `old` where `skip` (a traced bool; None: never skip)."""
    return new if skip is None else keep_if_bad(skip, old, new)


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """optax.scale_by_adam (same state, same arithmetic in the same order), skippable."""
    eps_root = 0.0

    def update(updates, state, params=None, *, skip=None, **_):
        del params
        mu = otu.tree_update_moment(updates, state.mu, b1, 1)
        nu = otu.tree_cast_like(otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
        count = optax.safe_increment(state.count)
        # The update reads the kept moments: one pass per moment, which XLA does in place.
        mu, nu, count = keep_if(skip, (state.mu, state.nu, state.count), (mu, nu, count))
        mu_hat = otu.tree_bias_correction(mu, b1, count)
        nu_hat = otu.tree_bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(optax.scale_by_adam(b1, b2, eps).init, update)


def scale_by_learning_rate(lr: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """optax.scale_by_learning_rate of a schedule, skippable (its step count stays)."""

    def update(updates, state, params=None, *, skip=None, **_):
        del params
        step_size = -1 * lr(state.count)
        updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        count = keep_if(skip, state.count, optax.safe_increment(state.count))
        return updates, optax.ScaleByScheduleState(count=count)

    return optax.GradientTransformationExtraArgs(optax.scale_by_learning_rate(lr).init, update)


def adamw(lr: optax.Schedule, *, b1: float, b2: float, eps: float,
          weight_decay: float) -> optax.GradientTransformationExtraArgs:
    """optax.adamw with a schedule, whose `update` takes `skip=` (module docstring)."""
    return optax.chain(scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay),
                       scale_by_learning_rate(lr))


def group_of(variable: nnx.Variable) -> str:
    for group in all_param_groups():
        if isinstance(variable, group.param_type):
            return group.name
    axes = getattr(variable, "logical_axes", ())
    return "matrix" if len(axes) >= 2 else "vector"


def param_groups(params: nnx.State) -> nnx.State:
    """A pytree like `params` whose leaves are group names."""
    return jax.tree.map(group_of, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)

    def group_adamw(scale: float, decay: float):
        return adamw(lambda step: lr(step) * scale, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=decay)

    labels = param_groups(params)
    per_group = {"matrix": group_adamw(1.0, cfg.weight_decay), "vector": group_adamw(1.0, 0.0)}
    # Every registered group, used by this model or not (an unused one holds an empty state): the
    # optimiser state has one shape for every scheme, so checkpoints of any scheme keep restoring.
    for group in all_param_groups():
        per_group[group.name] = group_adamw(group.lr_scale(cfg), cfg.weight_decay if group.weight_decay else 0.0)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*chain, optax.multi_transform(per_group, labels))
