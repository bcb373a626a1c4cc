"""Prefill and decoding through the model's one block forward (docs/methods.md §2.3).

`forward_cached` runs new tokens (a right-padded batch of prompts, or one token per row) through
`Transformer.run_blocks` with every block's attention replaced by a `CachedAttention` over that
block's cache. The blocks run one after another from parameters sliced once per call
(`block_params_fn`) rather than scanned: a scan copies every block's weights out of the stack on
every step, which at batch 1 costs as much as the step itself and is not skipped with the
sublayer. The routing (the model's `MoDPolicy.sample_routing`) is one of:

  * dense (no thresholds): every sublayer runs for every token;
  * thresholds, computed and discarded (`skip_compute=False`): every sublayer runs, the skipped
    tokens' updates are dropped. The reference path;
  * thresholds, really skipped (`skip_compute=True`): a sublayer that no active token executes is
    not computed (`lax.cond`). Same outputs, bit for bit.

`prefill_fn` runs a batch of prompts in one pass; `generation_fn` then samples on the device in one
`lax.while_loop` (per-row positions, per-row stopping at EOS or the token budget), so the measured
decode time is the model's, not Python's. Both count, per sublayer, how many active tokens
executed it and in how many calls it was computed at all (the realised saving).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax.infer.kv_cache import CachedAttention
from nagjax.model.mod import gather_tokens
from nagjax.model.residual.base import StepContext


def _counts(stats: dict, live_bt) -> dict:
    """Per block [2]: active tokens that executed each sublayer, and whether it ran at all (a scheme
    without skip statistics runs every sublayer for every token)."""
    n = jnp.sum(live_bt.astype(jnp.int32))
    executed = stats["executed_tokens"] if "executed_tokens" in stats else jnp.full((2,), n)
    ran = stats["ran"] if "ran" in stats else jnp.ones((2,), bool)
    return {"executed": executed, "ran": ran.astype(jnp.int32)}


def forward_cached(model, blocks: list, cache: list, tokens_bt, positions_bt, live_bt, tau, *,
                   skip_compute: bool, read_cache: bool):
    """(final stream state, cache, counts {executed, ran: [depth, 2]}) of new tokens at
    `positions_bt`; only `live_bt` tokens give K/V and are counted. `tau` None: dense. The blocks
    run one after another from `blocks` (`Transformer.block_params`), each with its own cache."""
    routing = model.mod_policy.sample_routing(tau, skip_compute=skip_compute, active=live_bt)

    def call(block, carry, positions, block_index, ctx, layer):
        state, cache = carry
        attention = CachedAttention(block.attn, cache[layer], live_bt, read_cache=read_cache)
        state, stats = block(state, positions, block_index, ctx, attention=attention)
        cache = list(cache)
        cache[layer] = attention.carry
        return (state, cache), _counts(stats, live_bt)

    (state, cache), counts = model.run_blocks(
        model.encode(tokens_bt), positions_bt, StepContext(routing=routing), call=call,
        per_block=np.arange(model.cfg.executed_depth), side=cache, blocks=blocks)
    return state, cache, counts


@functools.lru_cache(maxsize=16)
def prefill_fn(graphdef: nnx.GraphDef, *, thresholds: bool, skip_compute: bool, all_logits: bool = False):
    """jit: (params, blocks, empty cache, tokens_bt right-padded, lengths_b, tau) -> (logits, cache, counts):
    the prompts in one pass. Logits [b, V] of each row's last prompt token (`all_logits`: [b, t, V])."""

    def prefill(params, blocks, cache, tokens_bt, lengths_b, tau):
        model = nnx.merge(graphdef, params)
        b, t = tokens_bt.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        live = positions < lengths_b[:, None]
        state, cache, counts = forward_cached(model, blocks, cache, tokens_bt, positions, live,
                                              tau if thresholds else None, skip_compute=skip_compute,
                                              read_cache=False)
        if not all_logits:
            # the head only where the next token is sampled: each row's last prompt token
            state = jax.tree.map(lambda x: gather_tokens(x, (lengths_b - 1)[:, None]), state)
        logits = model.logits(state)
        return (logits if all_logits else logits[:, 0]), cache, counts

    return jax.jit(prefill, donate_argnums=(2,))


def _decode(model, blocks, cache, tokens_b, positions_b, active_b, tau, *, skip_compute: bool):
    state, cache, counts = forward_cached(model, blocks, cache, tokens_b[:, None], positions_b[:, None],
                                          active_b[:, None], tau, skip_compute=skip_compute, read_cache=True)
    return model.logits(state)[:, 0], cache, counts


@functools.lru_cache(maxsize=16)
def block_params_fn(graphdef: nnx.GraphDef):
    """jit: params -> every block's parameters on their own (`Transformer.block_params`), the
    `blocks` argument of decoding: sliced once, not on every step."""
    return jax.jit(lambda params: nnx.merge(graphdef, params).block_params())


@functools.lru_cache(maxsize=16)
def decode_step_fn(graphdef: nnx.GraphDef, *, thresholds: bool, skip_compute: bool):
    """jit: (params, blocks, cache, tokens_b, positions_b, active_b, tau) -> (logits [b, V], cache,
    counts): one token per row at its own position (teacher forcing, scoring)."""

    def step(params, blocks, cache, tokens_b, positions_b, active_b, tau):
        model = nnx.merge(graphdef, params)
        return _decode(model, blocks, cache, tokens_b, positions_b, active_b, tau if thresholds else None,
                       skip_compute=skip_compute)

    return jax.jit(step, donate_argnums=(2,))  # the cache is updated in place


def sample_tokens(logits_bv, key, temperature: float, top_k: int):
    """Greedy at temperature 0; else softmax(logits / temperature) over the top-k (0: all)."""
    if temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled = logits_bv / temperature
    if top_k > 0:
        kth = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def generation_fn(graphdef: nnx.GraphDef, *, thresholds: bool, skip_compute: bool, max_new_tokens: int,
                  temperature: float, top_k: int):
    """jit: (params, blocks, prefilled cache, logits_bv, lengths_b, tau, key, eos_id) -> (tokens [b, max_new] with
    -1 after a row stopped, decode steps, counts {executed, ran: [depth, 2], tokens}, final cache).

    Row b's first token comes from the prefill logits; its next tokens sit at positions
    lengths_b, lengths_b + 1, ... A row stops after EOS (finished rows execute nothing skippable
    and are not counted); the loop stops when every row has, or after `max_new_tokens`."""

    def generate(params, blocks, cache, logits_bv, lengths_b, tau, key, eos_id):
        model = nnx.merge(graphdef, params)
        tau = tau if thresholds else None
        b = logits_bv.shape[0]
        key, sub = jax.random.split(key)
        first = sample_tokens(logits_bv, sub, temperature, top_k)
        tokens = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
        depth = model.cfg.executed_depth
        counts = {"executed": jnp.zeros((depth, 2), jnp.int32), "ran": jnp.zeros((depth, 2), jnp.int32),
                  "tokens": jnp.zeros((), jnp.int32)}

        def more(carry):
            i, _, _, done, _, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def step(carry):
            i, cache, tokens, done, key, counts = carry
            active = ~done
            previous = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)
            logits, cache, c = _decode(model, blocks, cache, previous, lengths_b + i - 1, active, tau,
                                       skip_compute=skip_compute)
            key, sub = jax.random.split(key)
            token = jnp.where(active, sample_tokens(logits, sub, temperature, top_k), -1)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
            counts = {"executed": counts["executed"] + c["executed"], "ran": counts["ran"] + c["ran"],
                      "tokens": counts["tokens"] + jnp.sum(active.astype(jnp.int32))}
            return i + 1, cache, tokens, done | (token == eos_id), key, counts

        carry = (jnp.int32(1), cache, tokens, first == eos_id, key, counts)
        i, cache, tokens, _, _, counts = jax.lax.while_loop(more, step, carry)
        return tokens, i - 1, counts, cache

    # The prefilled cache is donated and comes back as the last output, so the loop updates it in
    # place instead of copying it into its carry first.
    return jax.jit(generate, donate_argnums=(2,))
