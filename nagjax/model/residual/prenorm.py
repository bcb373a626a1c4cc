"""Pre-LN baseline (SPEC 0) and LayerNorm Scaling (SPEC 3).

Pre-LN: `x <- x + F(Norm(x))`. LayerNorm Scaling multiplies the output of both pre-norms of block i
(0-based) by 1/sqrt(i + 1). The factor is computed from the static block index that the layer scan
feeds in, never stored as a variable, so initialisation or a checkpoint cannot overwrite it. The
final norm and the stream itself are not scaled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModelConfig
from nagjax.model.layers import RMSNorm, mean_rms
from nagjax.model.residual.base import State, StepContext, Sublayer


class PreNormStream(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)

    def embedding_table(self, raw_vd):
        return raw_vd

    def encode(self, embeddings_btd) -> State:
        return {"x": embeddings_btd}

    def logits(self, state: State, head_vd):
        h = self.final_norm(state["x"])
        return jnp.einsum("btd,vd->btv", h, head_vd.astype(h.dtype))

    def stream_rms(self, state: State):
        x32 = state["x"].astype(jnp.float32)
        return jnp.sqrt(jnp.mean(x32 * x32, axis=-1))


class PreNormResidual(nnx.Module):
    """The two pre-norms of one block; `layernorm_scaling` turns on LNS."""

    def __init__(self, cfg: ModelConfig, block_index, *, layernorm_scaling: bool, rngs: nnx.Rngs):
        del block_index  # the LNS factor is derived at call time from the scanned index
        self.norms = nnx.List([RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs) for _ in range(2)])
        self.layernorm_scaling = layernorm_scaling

    def __call__(self, state: State, sublayer: Sublayer, positions_bt, slot: int, block_index,
                 ctx: StepContext):
        x = state["x"]
        h = self.norms[slot](x)
        if self.layernorm_scaling:
            h = h * jax.lax.rsqrt(jnp.asarray(block_index, jnp.float32) + 1.0).astype(h.dtype)
        f = sublayer(h, positions_bt)
        new = x + f.astype(x.dtype)
        stats = {
            "stream_rms": mean_rms(new),
            "update_ratio": mean_rms(f) / (mean_rms(x) + 1e-12),
        }
        return {"x": new}, stats
