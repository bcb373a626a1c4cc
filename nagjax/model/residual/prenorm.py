"""Pre-LN baseline (docs/methods.md §0) and LayerNorm Scaling (§3).

Pre-LN: `x <- x + F(Norm(x))`. LayerNorm Scaling multiplies the output of both pre-norms of block i
(0-based) by 1/sqrt(i + 1). The factor is computed from the static block index that the layer scan
feeds in, never stored as a variable, so initialisation or a checkpoint cannot overwrite it. The
final norm and the stream itself are not scaled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModelConfig
from nagjax.model.layers import RMSNORM_ROW_FLOPS, RMSNorm, mean_rms
from nagjax.model.residual.base import Scheme, State, StepContext, Sublayer

RESIDUAL_ADD_FLOPS = 1  # per feature


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

    def head_inputs(self, state: State) -> State:
        return state

    def residual_vector(self, state: State):
        return state["x"].astype(jnp.float32)


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
        f = sublayer(h, positions_bt, kv=None)
        new = x + f.astype(x.dtype)
        stats = {
            "stream_rms": mean_rms(new),
            "update_ratio": mean_rms(f) / (mean_rms(x) + 1e-12),
        }
        return {"x": new}, stats


def sublayer_row_flops(cfg: ModelConfig, executed: float) -> float:
    """The pre-norm and the residual add, on every token (these schemes never skip)."""
    del executed
    return (RMSNORM_ROW_FLOPS + RESIDUAL_ADD_FLOPS) * cfg.d_model


def _scheme(name: str, description: str, layernorm_scaling: bool) -> Scheme:
    return Scheme(name=name, description=description, stream=PreNormStream,
                  block_residual=functools.partial(PreNormResidual, layernorm_scaling=layernorm_scaling),
                  sublayer_row_flops=sublayer_row_flops,
                  # the pre-norm gains are block weights, shared by the passes (as MobileLLM); the
                  # LNS factor is not a parameter and comes from the executed position
                  per_pass=False)


PRENORM = _scheme("prenorm", "Pre-LN baseline: x <- x + F(Norm(x))", layernorm_scaling=False)
LNS = _scheme("lns", "LayerNorm Scaling: Pre-LN with both pre-norms of block i scaled by 1/sqrt(i + 1)",
              layernorm_scaling=True)
