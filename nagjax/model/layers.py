"""Shared decoder parts (docs/methods.md §0): RMSNorm, RoPE, causal attention, SwiGLU.

Every residual scheme uses these same modules with the same initialisation. Parameters are float32
and carry `logical_axes` metadata (embed, heads, kv_heads, head_dim, mlp, vocab) that the sharding
rules map onto mesh axes; computation runs in the dtype the caller passes.

Both sublayers of a block take one call signature, `f(x_btd, positions_bt, kv=None) -> [b, t, d]`,
so a residual scheme (and Mixture-of-Depths) can call either without knowing which it holds:
`positions_bt` are the tokens' original positions (RoPE and causality stay right when a scheme runs
a sublayer on a subset of tokens) and `kv` (a `KVSource`) says where attention's keys and values
come from; the MLP is token-wise and ignores both. With document masking (`data.document_mask`)
`positions_bt` is [b, t, 2]: (position, document) per token (`document_positions`), and attention
lets a token see only earlier tokens of its own document; a routed sublayer gathers the pair with
its tokens, so Mixture-of-Depths keeps the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nagjax.config import ModelConfig

ATTENTION, MLP = 0, 1  # sublayer slots within a block, in execution order
SUBLAYER_NAMES = ("attn", "mlp")
RMSNORM_ROW_FLOPS = 4  # per feature: square, mean, scale, gain (the FLOP counter's row work)


def compute_dtype_name(cfg: ModelConfig, platform: str | None = None) -> str:
    """The activation dtype on `platform` (default: this backend): bf16 on accelerators, float32
    on CPU, unless the config pins it."""
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    return "bfloat16" if (platform or jax.default_backend()) in ("gpu", "tpu") else "float32"


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(compute_dtype_name(cfg))


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str, ...],
          kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A float32 parameter tagged with its logical axis names (one per dimension). `kind` is a
    `nnx.Param` subclass where a scheme puts the parameter in its own optimiser group."""
    assert len(axes) == len(shape), (shape, axes)
    return kind(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


def normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


def rms_normalize(x, eps: float):
    """x / RMS(x) over the last axis, reduced in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def mean_rms(x) -> jax.Array:
    """Mean over tokens of RMS(x) over the last axis, in float32 (a logging statistic)."""
    x32 = x.astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.mean(x32 * x32, axis=-1)))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",))
        self.eps = eps

    def __call__(self, x):
        return rms_normalize(x, self.eps) * self.scale[...].astype(x.dtype)


def rope(x_btnh, positions_bt, theta: float):
    """Rotary position embedding on the last axis (pairs split in halves, as in LLaMA)."""
    half = x_btnh.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions_bt.astype(jnp.float32)[..., None] * freq  # [b, t, half]
    sin = jnp.sin(angle)[:, :, None, :]
    cos = jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def document_positions(positions_bt, documents_bt):
    """(position, document) per token, [b, t, 2]: what a sublayer gets under document masking."""
    return jnp.stack([positions_bt, documents_bt], axis=-1).astype(jnp.int32)


def split_positions(positions):
    """[b, t] positions -> (positions, None); [b, t, 2] (position, document) -> (positions, documents)."""
    if positions.ndim == 3:
        return positions[..., 0], positions[..., 1]
    return positions, None


def _attention_impl(cfg: ModelConfig, dtype) -> str | None:
    if cfg.attention == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else None
    return cfg.attention


@dataclass(frozen=True)
class KVSource:
    """Where an attention sublayer's keys and values come from, when not from its own queries.

    `x_btd`/`positions_bt`: other tokens give K/V (e.g. every token while only the kept ones query,
    Mixture-of-Depths with kv="all"); `valid_bt`: only these tokens give K/V (kv="kept" at causal
    thresholds; one decoding token writes its K/V to the cache only where valid).
    """

    x_btd: jax.Array | None = None
    positions_bt: jax.Array | None = None
    valid_bt: jax.Array | None = None


class Attention(nnx.Module):
    """Causal multi-head attention with RoPE and optional grouped KV heads, no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        init = normal(cfg.init_std)
        self.wq = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wk = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wo = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"))
        self.cfg = cfg

    def queries(self, x_btd, positions_bt):
        """[b, t, heads, head_dim], rotated to the tokens' positions."""
        q = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...].astype(x_btd.dtype))
        return rope(q, positions_bt, self.cfg.rope_theta)

    def keys_values(self, x_btd, positions_bt):
        """(keys rotated to the tokens' positions, values), each [b, t, kv_heads, head_dim]."""
        k = jnp.einsum("btd,dnh->btnh", x_btd, self.wk[...].astype(x_btd.dtype))
        v = jnp.einsum("btd,dnh->btnh", x_btd, self.wv[...].astype(x_btd.dtype))
        return rope(k, positions_bt, self.cfg.rope_theta), v

    def project_out(self, heads_btnh):
        return jnp.einsum("btnh,nhd->btd", heads_btnh, self.wo[...].astype(heads_btnh.dtype))

    def __call__(self, x_btd, positions_bt, kv: KVSource | None = None):
        """Causal attention of the queries `x_btd` at `positions_bt` ([b, t], or [b, t, 2] with
        documents: then a query sees only keys of its own document, through the boolean mask).

        Without `kv` or documents the keys/values are the queries' own tokens in order (the fast
        `is_causal` path). With it, keys/values come from `kv.x_btd` (default: the queries' tokens), causal by
        position, and `kv.valid_bt` masks out tokens that give no K/V.
        """
        positions_bt, documents_bt = split_positions(positions_bt)
        q = self.queries(x_btd, positions_bt)
        other = kv is not None and kv.x_btd is not None
        src, src_pos = (kv.x_btd, kv.positions_bt) if other else (x_btd, positions_bt)
        src_pos, src_documents = split_positions(src_pos) if other else (src_pos, documents_bt)
        k, v = self.keys_values(src, src_pos)
        if kv is not None or documents_bt is not None:
            # causal by position; within one document positions are monotone even when they restart
            mask = src_pos[:, None, None, :] <= positions_bt[:, None, :, None]  # [b, 1, q, k]
            if documents_bt is not None:
                mask = mask & (src_documents[:, None, None, :] == documents_bt[:, None, :, None])
            if kv is not None and kv.valid_bt is not None:
                mask = mask & kv.valid_bt[:, None, None, :]
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=_attention_impl(self.cfg, x_btd.dtype)
            )
        out = checkpoint_name(out, "attention")  # what `model.remat=dots_attention` keeps
        return self.project_out(out)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_width
        init = normal(cfg.init_std)
        self.w_gate = param(rngs, init, (d, f), ("embed", "mlp"))
        self.w_up = param(rngs, init, (d, f), ("embed", "mlp"))
        self.w_down = param(rngs, init, (f, d), ("mlp", "embed"))

    def __call__(self, x_btd, positions_bt=None, kv: KVSource | None = None):
        """Token-wise: positions and K/V sources do not concern the MLP."""
        del positions_bt, kv
        dtype = x_btd.dtype
        gate = x_btd @ self.w_gate[...].astype(dtype)
        up = x_btd @ self.w_up[...].astype(dtype)
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dtype)
