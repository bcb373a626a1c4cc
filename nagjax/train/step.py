"""Pure, jit-compiled train and eval steps over (graphdef, params) of an NNX model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nagjax.config import ModConfig, ModelConfig
from nagjax.model.residual.base import StepContext


def cross_entropy(logits_btv, targets_bt):
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)


def alpha_scale(cfg: ModelConfig, step):
    """Linear warm-up of NAG's alpha from 0 over `model.nag.alpha_warmup_steps` (1 when off)."""
    warmup = cfg.nag.alpha_warmup_steps
    if cfg.residual != "nag" or warmup <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup)


def block_grad_norms(grads) -> jax.Array:
    """Per-block gradient norm [depth] over all parameters of each block (stacked on axis 0;
    a tapered model has one stack per stage, concatenated in block order)."""
    stacks = [grads["blocks"]] if "blocks" in grads else [grads["stages"][i] for i in sorted(grads["stages"].keys())]
    return jnp.concatenate([
        jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
                     for g in jax.tree.leaves(stack)))
        for stack in stacks
    ])


def init_aux(cfg: ModelConfig) -> dict:
    """Training-time accumulators saved with every checkpoint (not parameters)."""
    return {
        # CascadeFlow score (SPEC 5): sum over steps of each block's gradient norm.
        "block_grad_norm_sum": jnp.zeros((cfg.depth,), jnp.float32),
        # Mixture-of-Depths inference thresholds (SPEC 2): EMA of the batch's rate-quantile of m
        # per sublayer, so "execute iff m >= tau" realises the training skip rate causally.
        "mod_tau": jnp.zeros((cfg.depth, 2), jnp.float32),
        "mod_tau_updates": jnp.zeros((), jnp.int32),
    }


def update_thresholds(aux: dict, quantile_ld, decay: float) -> dict:
    """EMA with bias correction-free start: the first update takes the batch value."""
    first = aux["mod_tau_updates"] == 0
    tau = jnp.where(first, quantile_ld, decay * aux["mod_tau"] + (1.0 - decay) * quantile_ld)
    return {**aux, "mod_tau": tau, "mod_tau_updates": aux["mod_tau_updates"] + 1}


@dataclass(frozen=True)
class Steps:
    train: Callable  # (state, batch, step) -> (state, metrics); state = {params, opt_state, aux}
    eval: Callable  # (params, batch) -> (sum of token losses, token count)


def make_steps(graphdef: nnx.GraphDef, cfg: ModelConfig, optimizer: optax.GradientTransformation, lr_fn,
               mod: ModConfig | None = None) -> Steps:
    skipping = mod is not None and mod.rate > 0 and cfg.residual == "nag"

    def loss_fn(params, batch, step):
        model = nnx.merge(graphdef, params)
        ctx = StepContext(nag_alpha_scale=alpha_scale(cfg, step),
                          quantile_rates=(mod.rate,) if skipping else ())
        logits, stats = model(batch["inputs"], ctx=ctx)
        loss = jnp.mean(cross_entropy(logits, batch["targets"]))
        return loss, stats

    def train_step(state, batch, step):
        params, opt_state, aux = state["params"], state["opt_state"], state["aux"]
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        block_norms = block_grad_norms(grads)
        aux = {**aux, "block_grad_norm_sum": aux["block_grad_norm_sum"] + block_norms}
        if skipping:
            aux = update_thresholds(aux, stats.pop("gate_quantiles")[..., 0], mod.threshold_ema)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_fn(step),
            "layers": stats,  # each [depth, 2] (attention, MLP)
            "block_grad_norm": block_norms,
        }
        return {"params": params, "opt_state": opt_state, "aux": aux}, metrics

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["inputs"])
        losses = cross_entropy(logits, batch["targets"])
        return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)

    return Steps(train=jax.jit(train_step, donate_argnums=(0,)), eval=jax.jit(eval_step))
