"""The KV cache of decoding and the attention sublayer that uses it (docs/methods.md §2.3, §2.5).

Layout: a list with one cache per block, each its own buffer, so that a decoding step updates it
in place with no slicing of a stacked array: `k`, `v` [b, kv_heads, T, head_dim] (the layout the
score and value products read without a transpose) and `valid` [b, T]. Slot s of row b holds the
K/V of that row's token at position s. Every row has its own positions: a batch of prompts of
different lengths is right-padded, and each row's next token sits at its own position, which is
both its cache slot and its RoPE position. `valid` is False for padding, for slots not written
yet, and for tokens that gave no K/V in that block (Mixture-of-Depths with `mod.kv=kept`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nagjax.model.layers import KVSource


def init_cache(cfg, batch: int, max_len: int, dtype) -> list[dict]:
    shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
             "valid": jnp.zeros((batch, max_len), bool)} for _ in range(cfg.executed_depth)]


class CachedAttention:
    """One block's attention sublayer for new tokens (a whole prompt, or one token per row),
    against that block's KV cache, which it updates: `carry` is the cache after the call.

    New tokens write their K/V into their slots where they give K/V: where they are `live` and,
    under Mixture-of-Depths with kv="kept", where `kv.valid_bt` says they execute attention. A
    query at position p then attends to the valid slots up to p (with `read_cache` False, a
    prefill into an empty cache, only to the new tokens): the keys the full forward's causal
    attention sees. Writing first and reading the written cache lets XLA update it in place.

    The cache is `carry` so that Mixture-of-Depths can run this sublayer under `lax.cond`
    (`nagjax.model.mod.run_routed`, real skipping) and thread it through both branches; when every
    token gives K/V (kv="all"), `record_kv` writes them before the branch and the attention, if it
    runs, only reads the cache. A slot nothing writes stays invalid.
    """

    def __init__(self, attention, cache: dict, live_bt, *, read_cache: bool = True):
        self.attention, self.carry, self.live, self.read_cache = attention, cache, live_bt, read_cache
        self.recorded = None  # (k, v, gives) written by `record_kv` ahead of the call

    def record_kv(self, x_btd, positions_bt, gives_bt=None):
        """Write the new tokens' K/V ([b, t, kv, hd]) where they give K/V; the call that follows
        reads them instead of writing again."""
        k, v = self.attention.keys_values(x_btd, positions_bt)
        gives = self.live if gives_bt is None else gives_bt & self.live
        self.carry = write_kv(self.carry, positions_bt, k, v, gives)
        self.recorded = (k, v, gives)
        return self.recorded

    def __call__(self, x_btd, positions_bt, kv: KVSource | None = None):
        if kv is not None and kv.x_btd is not None:
            raise ValueError("CachedAttention: keys from other tokens (top-k routing) are a training path")
        if self.recorded is not None:
            k, v, gives = self.recorded
        else:
            k, v, gives = self.record_kv(x_btd, positions_bt, None if kv is None else kv.valid_bt)
        q = self.attention.queries(x_btd, positions_bt)
        if self.read_cache:
            valid = self.carry["valid"]  # [b, T], this call's tokens included
            upto = jnp.arange(valid.shape[1])[None, None, :] <= positions_bt[:, :, None]
            keys, values, mask = self.carry["k"], self.carry["v"], upto & valid[:, None, :]
        else:
            causal = positions_bt[:, None, :] <= positions_bt[:, :, None]  # [b, query, key]
            keys, values, mask = k.swapaxes(1, 2), v.swapaxes(1, 2), causal & gives[:, None, :]
        heads = attend(q, keys.astype(x_btd.dtype), values.astype(x_btd.dtype), mask)  # [b, kv, g, t, hd]
        b, t = positions_bt.shape
        heads = heads.astype(x_btd.dtype).transpose(0, 3, 1, 2, 4).reshape(b * t, -1)  # [b t, (kv g hd)]
        wo = self.attention.wo[...].astype(x_btd.dtype)  # [heads, hd, d]
        return (heads @ wo.reshape(-1, wo.shape[-1])).reshape(b, t, -1)


def attend(q_btnh, k_bksh, v_bksh, mask_bts) -> jax.Array:
    """Softmax attention with grouped KV heads, scores and weights in float32; masked keys are
    out. Returns [b, kv, groups, t, hd]; a query with no visible key gets zeros."""
    b, t, n, hd = q_btnh.shape
    q = q_btnh.reshape(b, t, k_bksh.shape[1], n // k_bksh.shape[1], hd)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_bksh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores * hd ** -0.5, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->bkgth", weights.astype(v_bksh.dtype), v_bksh, preferred_element_type=jnp.float32)
    return out / jnp.where(total > 0, total, 1.0)


def write_kv(cache: dict, positions_bt, k_btkh, v_btkh, valid_bt) -> dict:
    """One block's cache with K/V [b, t, kv, hd] stored at slots `positions_bt`; a slot is valid
    where `valid_bt` (the K/V of a token that gives none are stored but never read)."""
    rows = jnp.arange(positions_bt.shape[0])[:, None, None]
    heads = jnp.arange(cache["k"].shape[1])[None, None, :]
    slots = positions_bt[:, :, None]
    dtype = cache["k"].dtype
    return {
        "k": cache["k"].at[rows, heads, slots].set(k_btkh.astype(dtype)),
        "v": cache["v"].at[rows, heads, slots].set(v_btkh.astype(dtype)),
        "valid": cache["valid"].at[rows[:, :, 0], positions_bt].set(valid_bt),
    }
