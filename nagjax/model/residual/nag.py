"""NAG: the norm-agnostic residual (docs/methods.md §1).

The stream is two lanes per token: `log_norm` (float32 scalar, log of the stream RMS) and
`direction` (RMS 1, compute dtype). Sublayers read the direction only (no pre-norm) and write a
fixed-size update orthogonal to it, gated by the modulator m computed from the input direction; the
norm lane grows by 0.5*log1p(g^2) and acts at the head as an inverse temperature.

NAG's per-sublayer scalars and modulator (and the embedding gain g_enc) are `GateParam`s: the
`nag` optimiser group (no weight decay, learning rate x `optim.nag_lr_ratio`, §1.6). The modulator
is also Mixture-of-Depths' skip signal (§2.1): under a routing that skips, it is computed before
the sublayer and `nagjax.model.mod.run_routed` decides which tokens run it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ConfigError, ModelConfig, SchemeOptions
from nagjax.model import mod as modlib
from nagjax.model.layers import param
from nagjax.model.residual.base import MicroscopeStat, ParamGroup, Scheme, State, StepContext, Sublayer
from nagjax.sharding import map_over_batch
from pallas_kernels.nag_update import nag_update, resolve_impl
from pallas_kernels.nag_update.reference import gated_update, modulator
from pallas_kernels.nag_update.reference import nag_update as nag_update_reference

BETA_RAW_INIT = 0.5413  # softplus(0.5413) = 1.0
# Row work of the fused update per feature: centre 2, <f,D> 2, <D,D> 2, project 2, RMS 2, scale 1,
# D+gu 2, RMS 2, scale 1, misc 1 (counted from the reference implementation).
NAG_ROW_FLOPS = 17


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class NagConfig(SchemeOptions):
    """`model.nag.*`: modulator width, alpha warm-up, numerics, fused-update kernel (§1)."""

    modulator_channels: int = 32
    alpha_warmup_steps: int = 0  # linear warm-up of alpha from 0 (the port needed it at 64 layers)
    eps: float = 1e-6
    gate_floor: float = 1e-6  # clamp of the modulator's inner sum before the power
    # fused update (docs/methods.md §1.8): auto = the Pallas kernel on GPU/TPU, the reference on CPU
    kernel: Literal["reference", "pallas", "auto"] = "auto"
    # time the kernel's candidate tilings on the device at the first call per shape and cache the
    # fastest under $NAGJAX_CACHE_DIR/kernels (off: the tiling table shipped with the kernel)
    autotune: bool = False
    # [default] exp(s_0 + decode_log_gain) at init, the head's inverse temperature before any
    # sublayer; the decode log-gain starts at log(head_scale_init / model.init_std) (NagStream).
    head_scale_init: float = 8.0

    def validate(self, prefix: str = "model.nag") -> None:
        _check(self.modulator_channels >= 1, f"{prefix}.modulator_channels", "must be >= 1")
        _check(self.alpha_warmup_steps >= 0, f"{prefix}.alpha_warmup_steps", "must be >= 0")
        _check(0 < self.eps < 1, f"{prefix}.eps", "must be in (0, 1)")
        _check(0 < self.gate_floor < 1, f"{prefix}.gate_floor", "must be in (0, 1)")
        _check(self.head_scale_init > 0, f"{prefix}.head_scale_init", "must be > 0")


class GateParam(nnx.Param):
    """A NAG scalar or modulator parameter (alpha, beta, W, b, p, g_enc): the `nag` optimiser group."""


def centre_rows(w_vd):
    """Mean-centre each row over the feature axis (the centred parametrisation of §1.5)."""
    return w_vd - jnp.mean(w_vd, axis=-1, keepdims=True)


class NagStream(nnx.Module):
    """Centred embedding -> (log_norm, direction); cosine head scaled by exp(log_norm)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        zeros = jax.nn.initializers.zeros
        self.g_enc = param(rngs, zeros, (), (), kind=GateParam)
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

    def head_inputs(self, state: State) -> State:
        return state

    def residual_vector(self, state: State):
        return jnp.exp(state["log_norm"])[..., None] * state["direction"].astype(jnp.float32)


class NagResidual(nnx.Module):
    """Per-block NAG parameters for its two sublayers (attention = slot 0, MLP = slot 1)."""

    def __init__(self, cfg: ModelConfig, block_index, *, rngs: nnx.Rngs):
        d, c = cfg.d_model, cfg.nag.modulator_channels
        sublayer_number = 2 * jnp.asarray(block_index, jnp.float32) + jnp.arange(1.0, 3.0)  # 1-based
        self.alpha = GateParam(jax.lax.rsqrt(sublayer_number), logical_axes=("sublayer",))
        self.beta_raw = GateParam(jnp.full((2,), BETA_RAW_INIT, jnp.float32), logical_axes=("sublayer",))
        bound = math.sqrt(3.0 / d)
        uniform = jax.nn.initializers.uniform(2 * bound)
        w = uniform(rngs.params(), (2, c, d), jnp.float32) - bound
        self.mod_w = GateParam(w, logical_axes=("sublayer", "modulator", "embed"))
        self.mod_b = GateParam(jnp.zeros((2, c), jnp.float32), logical_axes=("sublayer", "modulator"))
        self.mod_logits = GateParam(jnp.zeros((2, c), jnp.float32), logical_axes=("sublayer", "modulator"))
        self.eps = cfg.nag.eps
        self.gate_floor = cfg.nag.gate_floor
        self.kernel = cfg.nag.kernel
        self.autotune = cfg.nag.autotune
        self.alpha_warmup_steps = cfg.nag.alpha_warmup_steps

    def gate_params(self, slot: int, step=None):
        """(alpha, beta, W, b, logits) of one sublayer, beta through softplus; in training
        (`step` given) alpha ramps up linearly over `model.nag.alpha_warmup_steps` (§1.6)."""
        alpha = self.alpha[...][slot]
        if step is not None and self.alpha_warmup_steps > 0:
            alpha = alpha * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / self.alpha_warmup_steps)
        return (
            alpha,
            jax.nn.softplus(self.beta_raw[...][slot]),
            self.mod_w[...][slot],
            self.mod_b[...][slot],
            self.mod_logits[...][slot],
        )

    def __call__(self, state: State, sublayer: Sublayer, positions_bt, slot: int, block_index,
                 ctx: StepContext):
        gate = self.gate_params(slot, ctx.step)
        alpha, beta, w, b, logits = gate
        routing = ctx.routing
        if routing is not None and routing.routes(slot):
            # m depends only on the input direction: Mixture-of-Depths reads it before the sublayer.
            m = modulator(state["direction"], w, b, logits, beta, gate_floor=self.gate_floor)
            new, executed = modlib.run_routed(
                routing, m, state, positions_bt, sublayer, slot,
                read=lambda s: s["direction"], apply=functools.partial(self._apply, gate=gate, m=m))
        else:
            f = sublayer(state["direction"], positions_bt, kv=None)
            direction, dlog, m = self._update(f, state["direction"], *gate)
            new = {"log_norm": state["log_norm"] + dlog, "direction": direction}
            executed = jnp.ones(m.shape, jnp.bool_)
        g = alpha * m * executed
        stats = {
            "stream_rms": jnp.mean(jnp.exp(new["log_norm"])),
            "update_ratio": jnp.mean(g),  # ||g u|| / ||D|| with RMS(u) = RMS(D) = 1
            "gate_mean": jnp.mean(m),
            "gate_floor_frac": jnp.mean((m <= self.gate_floor ** beta * (1 + 1e-3)).astype(jnp.float32)),
            "alpha": alpha,
            "beta": beta,
            **modlib.skip_stats(routing, m, executed),
        }
        return new, stats

    def _apply(self, f, state: State, executed, *, gate, m):
        """The update of the rows a routed sublayer ran for (`executed` None: all of them, e.g.
        the gathered top-k rows). Under thresholds the skipped rows get gain 0, an exact identity
        in both lanes (§1.2); the gain uses the m already computed for routing."""
        if executed is None:
            direction, dlog, _ = self._update(f, state["direction"], *gate)
        else:
            g = jnp.where(executed, gate[0], 0.0) * m  # per-token gain: the reference update
            direction, dlog = gated_update(f, state["direction"], g, eps=self.eps)
        return {"log_norm": state["log_norm"] + dlog, "direction": direction}

    def _update(self, f, direction, alpha, beta, w, b, logits):
        """The fused update of every row given (on the MoD top-k path: the gathered kept rows only).
        A Pallas kernel runs per batch shard (XLA cannot partition it); the reference is plain XLA."""
        impl = resolve_impl(self.kernel, direction.shape[-1], (f.dtype, direction.dtype))
        if impl == "reference":
            return nag_update_reference(f, direction, alpha, beta, w, b, logits, eps=self.eps,
                                        gate_floor=self.gate_floor)
        fn = functools.partial(nag_update, eps=self.eps, gate_floor=self.gate_floor, impl=impl,
                               autotune=self.autotune)
        return map_over_batch(fn, (f, direction), (alpha, beta, w, b, logits))


def modulator_flops(cfg: ModelConfig) -> float:
    """The skip signal, on every token of every sublayer: C x d mat-vec, sigmoid, softmax-weighted
    sum, power."""
    c = cfg.nag.modulator_channels
    return 2 * c * cfg.d_model + 6 * c


def sublayer_row_flops(cfg: ModelConfig, executed: float) -> float:
    return NAG_ROW_FLOPS * cfg.d_model * executed + modulator_flops(cfg)


NAG = Scheme(
    name="nag",
    description="norm-agnostic residual: norm lane + direction lane, orthogonal gated updates",
    stream=NagStream,
    block_residual=NagResidual,
    sublayer_row_flops=sublayer_row_flops,
    param_groups=(ParamGroup("nag", GateParam, lr_scale=lambda optim: optim.nag_lr_ratio),),
    logical_axes={"sublayer": None, "modulator": None},  # two slots, C channels: small, replicated
    microscope={"nag_gain": MicroscopeStat("update_ratio", "NAG realised gain g = alpha * m"),
                "nag_gate": MicroscopeStat("gate_mean", "NAG modulator m (mean)"),
                "nag_alpha": MicroscopeStat("alpha", "NAG alpha")},
    skip_signal=True,
    options=NagConfig,
)
