"""NAG: the norm-agnostic residual (SPEC 1).

The stream is two lanes per token: `log_norm` (float32 scalar, log of the stream RMS) and
`direction` (RMS 1, compute dtype). Sublayers read the direction only (no pre-norm) and write a
fixed-size update orthogonal to it, gated by the modulator m computed from the input direction; the
norm lane grows by 0.5*log1p(g^2) and acts at the head as an inverse temperature.

Parameter groups (SPEC 1, used by the optimiser): every parameter whose path contains one of
`NAG_PARAM_NAMES` is a NAG scalar/modulator parameter (no weight decay, lower learning rate).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModConfig, ModelConfig, kept_tokens
from nagjax.model.layers import param
from nagjax.model.residual.base import ATTENTION, State, StepContext, Sublayer
from nagjax.sharding import map_over_batch
from pallas_kernels.nag_update import nag_update
from pallas_kernels.nag_update.reference import modulator
from pallas_kernels.nag_update.reference import nag_update as nag_update_reference

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
        direction, log_norm = state["direction"], state["log_norm"]
        alpha, beta, w, b, logits = self.gate_params(slot)
        alpha = alpha * ctx.nag_alpha_scale
        update = functools.partial(self._update, impl=self.kernel)
        mod = ctx.mod if ctx.mod is not None and mod_applies(ctx.mod, slot) else None
        skipping = mod is not None and (ctx.mod_mode == "threshold" or mod.rate > 0)
        if skipping:  # m depends only on the input direction: MoD reads it before the sublayer
            m = modulator(direction, w, b, logits, beta, gate_floor=self.gate_floor)
        if skipping and ctx.mod_mode == "threshold":
            direction, dlog, executed = self._threshold(
                direction, m, sublayer, positions_bt, slot, block_index, ctx, mod, (alpha, beta, w, b, logits)
            )
        elif skipping:
            direction, dlog, executed = self._topk(
                direction, m, sublayer, positions_bt, slot, mod, update, (alpha, beta, w, b, logits)
            )
        else:
            f = sublayer(direction, positions_bt)
            direction, dlog, m = update(f, direction, alpha, beta, w, b, logits)
            executed = jnp.ones(m.shape, jnp.bool_)
        log_norm = log_norm + dlog
        g = alpha * m * executed
        skipped = 1.0 - executed.astype(jnp.float32)
        stats = {
            "stream_rms": jnp.mean(jnp.exp(log_norm)),
            "update_ratio": jnp.mean(g),  # ||g u|| / ||D|| with RMS(u) = RMS(D) = 1
            "gate_mean": jnp.mean(m),
            "gate_floor_frac": jnp.mean((m <= self.gate_floor ** beta * (1 + 1e-3)).astype(jnp.float32)),
            "alpha": alpha,
            "beta": beta,
            "skip_rate": jnp.mean(skipped),
            "skip_by_position": jnp.mean(skipped, axis=0),  # [t]: the layer x position heat map
            "gate_by_position": jnp.mean(m, axis=0),  # [t]
        }
        if ctx.quantile_rates:
            stats["gate_quantiles"] = jnp.quantile(m.reshape(-1), jnp.asarray(ctx.quantile_rates))
        return {"log_norm": log_norm, "direction": direction}, stats

    def _update(self, f, direction, alpha, beta, w, b, logits, *, impl):
        """The fused update; a Pallas kernel runs per batch shard (XLA cannot partition it)."""
        fn = functools.partial(nag_update, eps=self.eps, gate_floor=self.gate_floor, impl=impl)
        if impl == "reference":
            return fn(f, direction, alpha, beta, w, b, logits)
        return map_over_batch(fn, (f, direction), (alpha, beta, w, b, logits))

    def _topk(self, direction, m, sublayer, positions_bt, slot, mod, update, gate):
        """Training path: run the sublayer on the top-k tokens by m of each sequence only."""
        t = direction.shape[1]
        k = kept_tokens(t, mod.rate)
        idx_bk = jnp.sort(jax.lax.top_k(m, k)[1], axis=-1)  # order (and so causality) preserved
        take = lambda x: jnp.take_along_axis(x, idx_bk.reshape(idx_bk.shape + (1,) * (x.ndim - 2)), axis=1)
        d_bkd, pos_bk = take(direction), take(positions_bt)
        if slot == ATTENTION and mod.kv == "all":
            f = sublayer(d_bkd, pos_bk, kv_btd=direction, kv_positions_bt=positions_bt)
        else:
            f = sublayer(d_bkd, pos_bk)
        new_bkd, dlog_bk, _ = update(f, d_bkd, *gate)
        rows = jnp.arange(direction.shape[0])[:, None]
        direction = direction.at[rows, idx_bk].set(new_bkd.astype(direction.dtype))
        dlog = jnp.zeros(m.shape, jnp.float32).at[rows, idx_bk].set(dlog_bk)
        executed = jnp.zeros(m.shape, jnp.bool_).at[rows, idx_bk].set(True)
        return direction, dlog, executed

    def _threshold(self, direction, m, sublayer, positions_bt, slot, block_index, ctx, mod, gate):
        """Causal inference path: token executes iff m >= tau (no look at other tokens' m).

        Computes the sublayer densely and discards the skipped tokens' updates (g = 0 is an exact
        identity); with kv="kept" skipped tokens are masked out of the attention keys. This path
        measures accuracy at a skip rate; the compute saving is counted by `flops`, not realised.
        """
        alpha, beta, w, b, logits = gate
        tau = jnp.asarray(ctx.mod_tau)[block_index, slot]
        executed = m >= tau
        if slot == ATTENTION and mod.kv == "kept":
            f = sublayer(direction, positions_bt, kv_valid_bt=executed)
        else:
            f = sublayer(direction, positions_bt)
        alpha_bt = jnp.where(executed, alpha, 0.0)  # per-token gain: the reference update
        new, dlog, _ = nag_update_reference(
            f, direction, alpha_bt, beta, w, b, logits, eps=self.eps, gate_floor=self.gate_floor
        )
        return new, dlog, executed


def mod_applies(mod: ModConfig, slot: int) -> bool:
    return mod.sublayers == "both" or (mod.sublayers == "attention") == (slot == ATTENTION)


