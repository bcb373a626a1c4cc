"""Pure, jit-compiled train and eval steps over (graphdef, params) of an NNX model.

A train step can split its batch into `train.grad_accum` microbatches (a scan that sums float32
gradients, then one optimiser update: a larger global batch without more activation memory), and
computes token losses in chunks when a batch's float32 logits would be large (`train/loss.py`).
Every train step is judged by the bad-step guard (guard.py) before its update is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nagjax.config import ModelConfig, TrainConfig
from nagjax.model.layers import document_positions
from nagjax.model.mod import MoDPolicy
from nagjax.model.mod.thresholds import init_thresholds, update_thresholds
from nagjax.model.residual.base import StepContext
from nagjax.model.transformer import block_stacks_of
from nagjax.sharding import batch_shards, constrain
from nagjax.train import guard as guard_lib
from nagjax.train.optim import applied_updates
from nagjax.train.loss import chunk_length, token_losses


def block_grad_norms(cfg: ModelConfig, grads) -> jax.Array:
    """Per-block gradient norm [depth] over all parameters of each block (each stack of blocks,
    `transformer.block_stacks_of`, holds them on axis 0; concatenated in block order)."""
    return jnp.concatenate([
        jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
                     for g in jax.tree.leaves(stack)))
        for stack, _ in block_stacks_of(cfg, grads)
    ])


def init_aux(cfg: ModelConfig) -> dict:
    """Training-time accumulators saved with every checkpoint (not parameters)."""
    return {
        # CascadeFlow score (docs/methods.md §5): sum over steps of each block's gradient norm.
        "block_grad_norm_sum": jnp.zeros((cfg.depth,), jnp.float32),
        # Mixture-of-Depths inference thresholds (§2.3), updated while training skips.
        **init_thresholds(cfg.executed_depth),
        # Bad-step counters and the loss's running mean (guard.py).
        "guard": guard_lib.init_guard(),
    }


@dataclass(frozen=True)
class Steps:
    train: Callable  # (state, batch, step) -> (state, metrics); state = {params, opt_state, aux}
    # (params, aux, batch) -> {"loss_sum", "count"} (+ "loss_topk_sum", "skip_rate" [depth, 2] for
    # a model that trains with Mixture-of-Depths); always causal (see `eval_losses`)
    eval: Callable
    eval_losses: Callable  # (params, aux, batch) -> per-token losses [b, t], the causal evaluation


def microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ...: each microbatch spreads
    over every device of a batch-sharded mesh (a contiguous split would leave devices idle)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def token_loss(model, state: dict, targets_bt, loss_chunk_tokens: int = 0):
    """Per-token cross-entropy of a final stream state, in chunks when the logits are large."""
    b, t = targets_bt.shape
    chunk = chunk_length(max(b // batch_shards(over_stages=True), 1), t, model.cfg.vocab_size, loss_chunk_tokens)
    return token_losses(model.logits, model.stream.head_inputs(state), targets_bt, chunk)


def batch_positions(batch: dict):
    """The positions a batch asks for: (position, document) per token [b, t, 2] when it carries
    documents (`data.document_mask`, nagjax/data/pipeline.py), else None (0..t-1, no masking)."""
    if "documents" not in batch:
        return None
    return document_positions(batch["positions"], batch["documents"])


def train_loss(graphdef: nnx.GraphDef, params, batch: dict, step, routing,
               loss_chunk_tokens: int = 0) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy of a training batch and the model's per-sublayer stats."""
    model = nnx.merge(graphdef, params)
    state, stats = model.forward(batch["inputs"], batch_positions(batch), ctx=StepContext(step=step, routing=routing))
    return jnp.mean(token_loss(model, state, batch["targets"], loss_chunk_tokens)), stats


def make_steps(graphdef: nnx.GraphDef, cfg: ModelConfig, optimizer: optax.GradientTransformation, lr_fn,
               policy: MoDPolicy | None = None, train: TrainConfig | None = None) -> Steps:
    """The jitted steps of the model `graphdef`; `policy` is the Mixture-of-Depths policy the model
    was built with (`training_state` builds it once for both; None: dense). Every routing decision
    (training top-k and its threshold EMA, causal evaluation) is the policy's."""
    policy = MoDPolicy.of(cfg) if policy is None else policy
    skipping = policy.skipping
    train = TrainConfig() if train is None else train
    accum = train.grad_accum

    def loss_fn(params, batch, step):
        return train_loss(graphdef, params, batch, step, policy.train_routing(batch["inputs"].shape[1]),
                          loss_chunk_tokens=train.loss_chunk_tokens)

    def loss_and_grads(params, batch, step):
        if accum == 1:
            return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, step)

        def one(total, micro):
            micro = {k: constrain(v, ("batch",) + ("sequence",) * (v.ndim - 1)) for k, v in micro.items()}
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro, step)
            grad_sum, loss_sum = total
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (grad_sum, loss_sum + loss), stats

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grad_sum, loss_sum), stats = jax.lax.scan(one, (zeros, jnp.float32(0)), microbatches(batch, accum))
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
        stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)  # means over equal microbatches
        return (loss_sum / accum, stats), grads

    def train_step(state, batch, step):
        params, opt_state, aux = state["params"], state["opt_state"], state["aux"]
        guard = aux["guard"]
        (loss, stats), grads = loss_and_grads(params, batch, step)
        grad_norm = optax.tree.norm(grads)
        # A bad step (guard.py) changes nothing but the guard's counters; the optimiser skips it
        # itself (optim.py: selecting the old state afterwards made XLA copy every moment).
        bad = guard_lib.is_bad(guard, loss, grad_norm, train)
        updates, new_opt_state = optimizer.update(grads, opt_state, params, skip=bad)
        new_params = guard_lib.keep_if_bad(bad, params, optax.apply_updates(params, updates))
        block_norms = block_grad_norms(cfg, grads)
        accumulators = {k: v for k, v in aux.items() if k != "guard"}
        new_accumulators = {**accumulators,
                            "block_grad_norm_sum": accumulators["block_grad_norm_sum"] + block_norms}
        if skipping:
            new_accumulators = update_thresholds(
                new_accumulators, stats.pop("gate_quantiles")[..., 0], policy.mod.threshold_ema)
        new_accumulators = guard_lib.keep_if_bad(bad, accumulators, new_accumulators)
        guard = guard_lib.advance(guard, bad, loss)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # the rate this step's update used (a skipped step: the one the next update will use):
            # the schedule follows applied updates, not the global step (optim.applied_updates)
            "lr": lr_fn(applied_updates(opt_state)),
            "layers": stats,  # each [depth, 2] (attention, MLP)
            "block_grad_norm": block_norms,
            "guard": {"bad": bad, **{k: guard[k] for k in ("bad_streak", "skipped_steps", "rollbacks")}},
        }
        new_state = {"params": new_params, "opt_state": new_opt_state, "aux": {**new_accumulators, "guard": guard}}
        return new_state, metrics

    def eval_losses(params, aux, batch, *, with_stats=False):
        """Per-token losses, causal (`MoDPolicy.eval_routing`): a model that trains with MoD runs
        its trained thresholds (a token executes a sublayer iff m >= tau, looking at no later
        token; docs §2.3), any other densely."""
        model = nnx.merge(graphdef, params)
        ctx = StepContext(routing=policy.eval_routing(aux))
        state, stats = model.forward(batch["inputs"], batch_positions(batch), ctx=ctx)
        losses = token_loss(model, state, batch["targets"], train.loss_chunk_tokens)
        return (losses, stats) if with_stats else losses

    def eval_step(params, aux, batch):
        losses, stats = eval_losses(params, aux, batch, with_stats=True)
        out = {"loss_sum": jnp.sum(losses), "count": jnp.asarray(losses.size, jnp.float32)}
        if skipping:  # the training-time top-k over whole sequences: a diagnostic, not causal
            model = nnx.merge(graphdef, params)
            state, _ = model.forward(batch["inputs"], batch_positions(batch),
                                     ctx=StepContext(routing=policy.train_routing()))
            out["loss_topk_sum"] = jnp.sum(token_loss(model, state, batch["targets"], train.loss_chunk_tokens))
            out["skip_rate"] = stats["skip_rate"]
        return out

    return Steps(train=jax.jit(train_step, donate_argnums=(0,)), eval=jax.jit(eval_step),
                 eval_losses=jax.jit(eval_losses))
