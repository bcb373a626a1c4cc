"""Autoregressive sampling with a KV cache and causal Mixture-of-Depths thresholds.

Every token (prompt and generated) goes through one jit-compiled decode step that reuses the
model's own residual modules on a length-1 sequence: a NAG sublayer runs for the token iff its
modulator m >= tau (the thresholds calibrated during training, or none for dense), and under
kv="kept" a token that skips attention writes no K/V. The realised skip rate is counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax.model.layers import compute_dtype
from nagjax.model.residual.base import ATTENTION, MLP, StepContext


def init_cache(cfg, batch: int, max_len: int, dtype) -> dict:
    shape = (cfg.depth, batch, max_len, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((cfg.depth, batch, max_len), bool)}


def make_decode_step(graphdef: nnx.GraphDef, threshold_mode: bool):
    """jit: (params, cache, tokens_b, position, tau [depth, 2]) -> (logits [b, V], cache, skip [depth, 2])."""

    def decode_block(block, carry, positions, index, seg_ctx, cache_l):
        """One block for one token: the model's own residual modules, attention via the cache."""
        if not threshold_mode:
            seg_ctx = dataclasses.replace(seg_ctx, mod=None)  # dense decoding
        written = {}

        def attend(x, pos, kv_valid_bt=None, **_):
            write = kv_valid_bt[:, 0] if kv_valid_bt is not None else jnp.ones(x.shape[0], bool)
            out, written["cache"] = block.attn.decode(x, pos, cache_l, write)
            return out

        carry, s_attn = block.residual(carry, attend, positions, ATTENTION, index, seg_ctx)
        carry, s_mlp = block.residual(carry, lambda x, p, **_: block.mlp(x), positions, MLP, index, seg_ctx)
        skip = jnp.stack([s.get("skip_rate", jnp.float32(0)) for s in (s_attn, s_mlp)])
        return carry, (written["cache"], skip)

    def step(params, cache, tokens_b, position, tau):
        model = nnx.merge(graphdef, params)
        cfg = model.cfg
        positions = jnp.full((tokens_b.shape[0], 1), position, jnp.int32)
        table = model.stream.embedding_table(model.embed[...])
        state = model.stream.encode(jnp.take(table, tokens_b[:, None], axis=0).astype(compute_dtype(cfg)))
        if threshold_mode and model.mod is None:
            raise ValueError("threshold decoding needs a model built with a ModConfig")
        ctx = StepContext(mod_mode="threshold", mod_tau=tau) if threshold_mode else StepContext()
        state, (cache, skip) = model.run_blocks(state, positions, ctx, call=decode_block, per_block=cache)
        logits = model.stream.logits(state, model.head_table())[:, 0].astype(jnp.float32)
        return logits, cache, skip

    return jax.jit(step)


@dataclass
class Sample:
    text: str
    tokens: list[int]
    skip_rate: float  # over all sublayers and all processed tokens
    skip_rate_by_sublayer: np.ndarray  # [depth, 2]


def generate(run, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, thresholds: np.ndarray | None = None) -> Sample:
    """Sample a continuation of `prompt` from a loaded run (analysis.diagnostics.Run)."""
    cfg = run.config.model
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)  # training text has EOS between documents
    max_len = len(ids) + max_new_tokens
    threshold_mode = thresholds is not None
    step = make_decode_step(run.graphdef, threshold_mode)
    tau = jnp.asarray(thresholds if threshold_mode else np.zeros((cfg.depth, 2)), jnp.float32)
    cache = init_cache(cfg, 1, max_len, compute_dtype(cfg))
    key = jax.random.key(seed)
    out, skip_sum, logits = list(ids), np.zeros((cfg.depth, 2)), None
    for pos in range(max_len - 1):
        logits, cache, skip = step(run.params, cache, jnp.asarray([out[pos]], jnp.int32), pos, tau)
        skip_sum += np.asarray(skip)
        if pos + 1 < len(ids):
            continue  # still reading the prompt
        key, sub = jax.random.split(key)
        scaled = logits[0] / max(temperature, 1e-6)
        if top_k > 0:
            kth = jnp.sort(scaled)[-min(top_k, scaled.shape[-1])]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        token = int(jax.random.categorical(sub, scaled)) if temperature > 0 else int(jnp.argmax(logits[0]))
        out.append(token)
        if token == tokenizer.eos_id:
            break
    by_sublayer = skip_sum / max(len(out) - 1, 1)
    return Sample(tokenizer.decode(out[len(ids):]), out, float(by_sublayer.mean()), by_sublayer)
