"""NAG: the norm-agnostic residual (SPEC 1).

The stream is two lanes per token: `log_norm` (float32 scalar, log of the stream RMS) and
`direction` (RMS 1, compute dtype). Sublayers read the direction only (no pre-norm) and write a
fixed-size update orthogonal to it, gated by the modulator m computed from the input direction; the
norm lane grows by 0.5*log1p(g^2) and acts at the head as an inverse temperature.

Parameter groups (SPEC 1, used by the optimiser): every parameter whose path contains one of
`NAG_PARAM_NAMES` is a NAG scalar/modulator parameter (no weight decay, lower learning rate).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModelConfig
from nagjax.model.layers import param
from nagjax.model.residual.base import State, StepContext, Sublayer
from pallas_kernels.nag_update import nag_update

NAG_PARAM_NAMES = ("alpha", "beta_raw", "mod_w", "mod_b", "mod_logits", "g_enc")
BETA_RAW_INIT = 0.5413  # softplus(0.5413) = 1.0


def centre_rows(w_vd):
    """Mean-centre each row over the feature axis (the centred parametrisation of SPEC 1)."""
    return w_vd - jnp.mean(w_vd, axis=-1, keepdims=True)


class NagStream(nnx.Module):
    """Centred embedding -> (log_norm, direction); cosine head scaled by exp(log_norm)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        zeros = jax.nn.initializers.zeros
        self.g_enc = param(rngs, zeros, (), ())
        gain0 = math.log(cfg.nag.head_scale_init / cfg.init_std)
        self.decode_log_gain = nnx.Param(jnp.float32(gain0), logical_axes=())
        self.eps = cfg.nag.eps

    def embedding_table(self, raw_vd):
        return centre_rows(raw_vd)

    def encode(self, embeddings_btd) -> State:
        e32 = embeddings_btd.astype(jnp.float32)
        ms = jnp.mean(e32 * e32, axis=-1)
        log_rms = 0.5 * jnp.log(ms + self.eps * self.eps)
        direction = e32 * jnp.exp(-log_rms)[..., None]
        return {
            "log_norm": log_rms + self.g_enc[...],
            "direction": direction.astype(embeddings_btd.dtype),
        }

    def logits(self, state: State, head_vd):
        d = head_vd.shape[-1]
        w = centre_rows(head_vd.astype(jnp.float32))
        w = w * jax.lax.rsqrt(jnp.mean(w * w, axis=-1, keepdims=True) + self.eps * self.eps)
        direction = state["direction"]
        cosine = jnp.einsum("btd,vd->btv", direction, w.astype(direction.dtype)) / d
        scale = jnp.exp(state["log_norm"] + self.decode_log_gain[...])
        return cosine.astype(jnp.float32) * scale[..., None]

    def stream_rms(self, state: State):
        return jnp.exp(state["log_norm"])


class NagResidual(nnx.Module):
    """Per-block NAG parameters for its two sublayers (attention = slot 0, MLP = slot 1)."""

    def __init__(self, cfg: ModelConfig, block_index, *, rngs: nnx.Rngs):
        d, c = cfg.d_model, cfg.nag.modulator_channels
        sublayer_number = 2 * jnp.asarray(block_index, jnp.float32) + jnp.arange(1.0, 3.0)  # 1-based
        self.alpha = nnx.Param(jax.lax.rsqrt(sublayer_number), logical_axes=("sublayer",))
        self.beta_raw = nnx.Param(jnp.full((2,), BETA_RAW_INIT, jnp.float32), logical_axes=("sublayer",))
        bound = math.sqrt(3.0 / d)
        uniform = jax.nn.initializers.uniform(2 * bound)
        w = uniform(rngs.params(), (2, c, d), jnp.float32) - bound
        self.mod_w = nnx.Param(w, logical_axes=("sublayer", "modulator", "embed"))
        self.mod_b = nnx.Param(jnp.zeros((2, c), jnp.float32), logical_axes=("sublayer", "modulator"))
        self.mod_logits = nnx.Param(
            jnp.zeros((2, c), jnp.float32), logical_axes=("sublayer", "modulator")
        )
        self.eps = cfg.nag.eps
        self.gate_floor = cfg.nag.gate_floor
        self.kernel = cfg.nag.kernel

    def gate_params(self, slot: int):
        """(alpha, beta, W, b, logits) of one sublayer, beta through softplus."""
        return (
            self.alpha[...][slot],
            jax.nn.softplus(self.beta_raw[...][slot]),
            self.mod_w[...][slot],
            self.mod_b[...][slot],
            self.mod_logits[...][slot],
        )

    def __call__(self, state: State, sublayer: Sublayer, positions_bt, slot: int, block_index,
                 ctx: StepContext):
        del block_index
        direction = state["direction"]
        alpha, beta, w, b, logits = self.gate_params(slot)
        alpha = alpha * ctx.nag_alpha_scale
        f = sublayer(direction, positions_bt)
        new_direction, dlog, m = nag_update(
            f, direction, alpha, beta, w, b, logits, eps=self.eps, gate_floor=self.gate_floor
        )
        log_norm = state["log_norm"] + dlog
        g = alpha * m
        stats = {
            "stream_rms": jnp.mean(jnp.exp(log_norm)),
            "update_ratio": jnp.mean(g),  # ||g u|| / ||D|| with RMS(u) = RMS(D) = 1
            "gate_mean": jnp.mean(m),
            "gate_floor_frac": jnp.mean((m <= self.gate_floor ** beta * (1 + 1e-3)).astype(jnp.float32)),
            "alpha": alpha,
            "beta": beta,
        }
        return {"log_norm": log_norm, "direction": new_direction}, stats
