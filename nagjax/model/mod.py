"""Mixture-of-Depths (docs/methods.md §2): every routing decision, in one place.

A scheme with a skip signal (`Scheme.skip_signal`, NAG's modulator m) hands its sublayer to
`run_routed`, which decides which tokens execute it:

  * `topk` (training, real savings): per sequence, the k = ceil((1 - r) T) tokens with the largest
    signal, in their original order, are gathered, run through the sublayer and scattered back;
  * `threshold` (causal inference): a token executes iff its signal >= tau[block, slot]; the
    sublayer runs densely and the scheme leaves skipped tokens exactly unchanged, or, with
    `skip_compute` (decoding), it runs under `lax.cond` only when some token executes it, so a
    skipped sublayer is really not computed (same outputs, bit for bit);
  * `dense`: every token executes (the exempt first blocks, a dense model, calibration passes).

Also here: which sublayers and blocks may skip (`routes`, `segments`), the K/V rule (`mod.kv`), the
executed fractions and selection cost for the FLOP counter, the per-sublayer skip statistics, and
the thresholds' EMA during training and their calibration after it. The model, the train step, the
FLOP counter, sampling and the analysis all call these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax.config import ConfigError, ModConfig, ModelConfig
from nagjax.model.layers import ATTENTION, KVSource


def kept_tokens(seq_len: int, rate: float) -> int:
    """Tokens per sequence that run a skipping sublayer: k = ceil((1 - r) T), at least 1."""
    return max(1, math.ceil((1.0 - rate) * seq_len - 1e-9))


def has_skip_signal(model: ModelConfig) -> bool:
    from nagjax.model.residual import get_scheme

    return get_scheme(model.residual).skip_signal


def skipping(model: ModelConfig, mod: ModConfig | None) -> bool:
    """Whether training skips tokens: `mod.rate > 0` on a scheme with a skip signal. A rate on a
    scheme without one is a ConfigError (config validation calls this)."""
    if mod is None or mod.rate == 0:
        return False
    if not has_skip_signal(model):
        from nagjax.model.residual import SCHEMES

        able = [name for name, s in SCHEMES.items() if s.skip_signal]
        raise ConfigError(
            f"mod.rate={mod.rate}: Mixture-of-Depths needs a residual scheme with a skip signal "
            f"(model.residual one of {', '.join(map(repr, able))}; got {model.residual!r}) or mod.rate=0")
    return True


def require_skip_signal(model: ModelConfig, what: str) -> None:
    if not has_skip_signal(model):
        raise ConfigError(f"{what} needs a residual scheme with a skip signal (e.g. model.residual=nag); "
                          f"this model is {model.residual!r}")


# ---------------------------------------------------------------------------------------------
# Routing: what one forward pass does
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    config: ModConfig | None = None  # which sublayers may skip, the exempt blocks, the K/V rule, r
    mode: Literal["dense", "topk", "threshold"] = "dense"
    tau: Any = None  # [depth, 2] thresholds of "threshold" mode (execute iff signal >= tau)
    quantile_rates: tuple[float, ...] = ()  # report these quantiles of the signal (calibration)
    # Inference ("threshold" mode). skip_compute: a sublayer runs (lax.cond) only when some token
    # executes it, so a skipped sublayer costs nothing (decoding); False computes it for every
    # token and discards the skipped updates. active: [b, t] tokens that exist (not padding, not a
    # finished row); the others execute no skippable sublayer and are left out of the counts.
    skip_compute: bool = False
    active: Any = None
    # Calibration under skipping ("threshold" mode): each sublayer's tau is the quantile_rates[0]-
    # quantile of its signal over this pass's tokens, so later sublayers see earlier ones skip.
    self_calibrating: bool = False

    @property
    def skips(self) -> bool:
        """Whether any token may skip in this pass (else the whole stack runs densely)."""
        if self.config is None:
            return False
        return self.mode == "threshold" or (self.mode == "topk" and self.config.rate > 0)

    def routes(self, slot: int) -> bool:
        """Whether sublayer `slot` of a block in a routed segment may skip (`mod.sublayers`)."""
        if not self.skips:
            return False
        which = self.config.sublayers
        return which == "both" or (which == "attention") == (slot == ATTENTION)


DENSE = Routing()


def training_routing(mod: ModConfig | None, *, calibrate: bool = False) -> Routing:
    """Top-k at the configured rate; `calibrate` also reports the r-quantile of the signal (the
    training step's threshold EMA)."""
    if mod is None:
        return DENSE
    return Routing(config=mod, mode="topk", quantile_rates=(mod.rate,) if calibrate else ())


def threshold_routing(mod: ModConfig, tau, quantile_rates: tuple[float, ...] = (), *,
                      skip_compute: bool = False, active=None) -> Routing:
    """Causal routing: a token executes a sublayer iff its signal >= tau [depth, 2] (and it is
    `active`); `skip_compute` really skips a sublayer that no token executes (see `Routing`)."""
    if mod is None:
        raise ValueError("threshold routing needs the model's ModConfig (a scheme with a skip signal)")
    return Routing(config=mod, mode="threshold", tau=tau, quantile_rates=tuple(quantile_rates),
                   skip_compute=skip_compute, active=active)


def inference_routing(mod: ModConfig | None, tau=None, *, skip_compute: bool = True, active=None) -> Routing:
    """Routing for generation: dense without thresholds (`tau` None), else causal thresholds that
    really skip (`skip_compute`) or compute and discard (the reference path, same outputs)."""
    if tau is None:
        return Routing(active=active)
    return threshold_routing(mod, tau, skip_compute=skip_compute, active=active)


def eligible_sublayers(depth: int, routing: Routing) -> np.ndarray:
    """[depth, 2] bool: the sublayers that may skip under `routing` (routed segments, `mod.sublayers`)."""
    out = np.zeros((depth, 2), bool)
    for start, stop, seg in segments(depth, routing):
        for slot in (0, 1):
            out[start:stop, slot] = seg.routes(slot)
    return out


def segments(depth: int, routing: Routing) -> list[tuple[int, int, Routing]]:
    """Runs of blocks [start, stop) scanned together with their routing: the exempt first blocks
    (`mod.exempt_first_blocks`) run densely, the rest routed (static code paths, no per-block cond)."""
    if not routing.skips:
        return [(0, depth, routing)]
    exempt = min(routing.config.exempt_first_blocks, depth)
    parts = [(0, exempt, replace(routing, mode="dense")), (exempt, depth, routing)]
    return [p for p in parts if p[1] > p[0]]


# ---------------------------------------------------------------------------------------------
# Running one sublayer for the selected tokens
# ---------------------------------------------------------------------------------------------


def select_topk(signal_bt, k: int):
    """Indices [b, k] of the k largest signals per sequence, in original order (causality kept)."""
    return jnp.sort(jax.lax.top_k(signal_bt, k)[1], axis=-1)


def _gather(x, idx_bk):
    return jnp.take_along_axis(x, idx_bk.reshape(idx_bk.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter(x, idx_bk, rows):
    batch = jnp.arange(x.shape[0])[:, None]
    return x.at[batch, idx_bk].set(rows.astype(x.dtype))


def run_routed(routing: Routing, signal_bt, state: dict, positions_bt, sublayer: Callable, slot: int,
               block_index, *, read: Callable, apply: Callable) -> tuple[dict, jax.Array]:
    """Run `sublayer` for the tokens `routing` selects; returns (new state, executed [b, t] bool).

    `read(state) -> x_btd` is the sublayer's input; `apply(f, state, executed)` is the scheme's
    update of a state given the sublayer output `f` for its rows, where `executed` is None when
    every row ran and else a [b, t] mask whose False rows must come back unchanged.

    K/V rule (`mod.kv`): with "kept" a token that skips attention gives no K/V there (top-k: only
    the gathered tokens exist for the sublayer; thresholds: skipped tokens are masked out of the
    keys); with "all" every token gives K/V (top-k: the gathered queries attend to all tokens).

    Real skipping (`routing.skip_compute`): the sublayer runs under `lax.cond` only when some
    token executes it; otherwise the state comes back unchanged, which is what `apply` returns
    when no row executed (the scheme's exact identity), so both paths give the same bits. Under
    kv="all" the skipping tokens still give K/V: a sublayer that keeps them (a cached attention)
    writes them with `sublayer.record_kv(x_btd, positions_bt)`, without computing its output.
    """
    attention_kv_all = slot == ATTENTION and routing.config.kv == "all"
    if routing.mode == "topk":
        idx_bk = select_topk(signal_bt, kept_tokens(signal_bt.shape[1], routing.config.rate))
        rows = {k: _gather(v, idx_bk) for k, v in state.items()}
        kv = KVSource(x_btd=read(state), positions_bt=positions_bt) if attention_kv_all else None
        f = sublayer(read(rows), _gather(positions_bt, idx_bk), kv=kv)
        new_rows = apply(f, rows, None)
        new = {k: _scatter(state[k], idx_bk, new_rows[k]) for k in state}
        executed = _scatter(jnp.zeros(signal_bt.shape, jnp.bool_), idx_bk, jnp.ones(idx_bk.shape, jnp.bool_))
        return new, executed
    if routing.mode != "threshold":
        raise ValueError(f"run_routed: routing mode {routing.mode!r} does not skip")
    if routing.self_calibrating:
        tau = jnp.quantile(signal_bt.reshape(-1), routing.quantile_rates[0])
    else:
        tau = jnp.asarray(routing.tau)[block_index, slot]
    executed = signal_bt >= tau
    if routing.active is not None:
        executed = executed & routing.active
    kv = KVSource(valid_bt=executed) if slot == ATTENTION and not attention_kv_all else None
    x_btd = read(state)
    if not routing.skip_compute:
        return apply(sublayer(x_btd, positions_bt, kv=kv), state, executed), executed

    def run():
        return apply(sublayer(x_btd, positions_bt, kv=kv), state, executed)

    def skip():
        record_kv = getattr(sublayer, "record_kv", None)
        if attention_kv_all and record_kv is not None:
            record_kv(x_btd, positions_bt)
        return state

    return _cond(jnp.any(executed), run, skip, sublayer), executed


def _cond(pred, run: Callable, skip: Callable, sublayer):
    """`lax.cond(pred, run, skip)`; a sublayer that keeps state between calls in `sublayer.carry`
    (a cached attention: its block's KV cache) gets that state threaded through both branches."""
    if not hasattr(sublayer, "carry"):
        return jax.lax.cond(pred, run, skip)

    def branch(fn):
        def go(carry):
            sublayer.carry = carry
            out = fn()
            return out, sublayer.carry

        return go

    out, sublayer.carry = jax.lax.cond(pred, branch(run), branch(skip), sublayer.carry)
    return out


def skip_stats(routing: Routing | None, signal_bt, executed_bt) -> dict[str, jax.Array]:
    """Per-sublayer statistics of a skip signal: realised skip rate, the layer x position heat map
    of skips and of the signal, and (when asked) the signal quantiles used to calibrate tau."""
    skipped = 1.0 - executed_bt.astype(jnp.float32)
    stats = {
        "skip_rate": jnp.mean(skipped),
        "skip_by_position": jnp.mean(skipped, axis=0),  # [t]
        "gate_by_position": jnp.mean(signal_bt, axis=0),  # [t]
    }
    if routing is not None and routing.quantile_rates:
        stats["gate_quantiles"] = jnp.quantile(signal_bt.reshape(-1), jnp.asarray(routing.quantile_rates))
    if routing is not None and routing.active is not None:  # inference counts, active tokens only
        executed_active = executed_bt & routing.active
        stats["executed_tokens"] = jnp.sum(executed_active.astype(jnp.int32))
        really = routing.skip_compute and routing.mode == "threshold"
        stats["ran"] = jnp.any(executed_active) if really else jnp.bool_(True)
    return stats


# ---------------------------------------------------------------------------------------------
# FLOP accounting (used by nagjax/flops.py)
# ---------------------------------------------------------------------------------------------


def executed_fractions(model: ModelConfig, seq_len: int, mod: ModConfig | None) -> np.ndarray:
    """[depth, 2] share of tokens that run each sublayer under top-k training (k/T), else 1."""
    out = np.ones((model.depth, 2))
    if not skipping(model, mod):
        return out
    keep = kept_tokens(seq_len, mod.rate) / seq_len
    routing = training_routing(mod)
    for slot in (0, 1):
        if routing.routes(slot):
            out[mod.exempt_first_blocks:, slot] = keep
    return out


def kv_follows_execution(mod: ModConfig | None) -> bool:
    """Whether a token gives K/V only where it executes attention (`mod.kv=kept`, or no MoD)."""
    return mod is None or mod.kv == "kept"


def selection_flops(seq_len: int, d_model: int, executed: float) -> float:
    """Per-token cost of routing one sublayer by top-k: gather and scatter of the kept rows, and
    the top-k itself (~log2 T comparisons)."""
    return 2 * d_model * executed + math.log2(seq_len)


# ---------------------------------------------------------------------------------------------
# Thresholds: EMA during training, calibration after it
# ---------------------------------------------------------------------------------------------


def init_thresholds(depth: int) -> dict[str, jax.Array]:
    """The training-state entries of the inference thresholds (saved in every checkpoint)."""
    return {"mod_tau": jnp.zeros((depth, 2), jnp.float32), "mod_tau_updates": jnp.zeros((), jnp.int32)}


def update_thresholds(aux: dict, quantile_ld, decay: float) -> dict:
    """tau <- EMA of the batch's r-quantile of the signal per sublayer (`mod.threshold_ema`), so
    that "execute iff m >= tau" realises the training skip rate causally. The first update takes
    the batch value (no bias correction needed)."""
    first = aux["mod_tau_updates"] == 0
    tau = jnp.where(first, quantile_ld, decay * aux["mod_tau"] + (1.0 - decay) * quantile_ld)
    return {**aux, "mod_tau": tau, "mod_tau_updates": aux["mod_tau_updates"] + 1}


def calibration_fn(graphdef: nnx.GraphDef, mod: ModConfig, rates: tuple[float, ...], *,
                   under_skipping: bool = False):
    """jit: (params, batch) -> [depth, 2, R] quantiles of the signal, the thresholds that would skip
    each rate: in a dense pass (tau = -inf, every token executes), or `under_skipping` (one rate)
    in a pass where every sublayer already skips that rate of the tokens."""
    from nagjax.model.residual.base import StepContext

    if under_skipping and len(rates) != 1:
        raise ValueError("calibration under skipping takes one rate per pass")

    def run(params, batch):
        model = nnx.merge(graphdef, params)
        if under_skipping:
            routing = Routing(config=mod, mode="threshold", quantile_rates=tuple(rates), self_calibrating=True)
        else:
            routing = threshold_routing(mod, jnp.full((model.cfg.depth, 2), -jnp.inf), rates)
        return model(batch["inputs"], ctx=StepContext(routing=routing))[1]["gate_quantiles"]

    return jax.jit(run)


def calibrate_thresholds(graphdef: nnx.GraphDef, params, batches, mod: ModConfig,
                         rates: tuple[float, ...], *, under_skipping: bool = False) -> np.ndarray:
    """[depth, 2, R]: per sublayer, the rate-quantiles of the signal averaged over `batches`.

    Dense (default; `nagjax eval --mod-sweep`): the quantiles of a pass where every token runs
    every sublayer. Skipping earlier sublayers shifts later signals, so the realised rate then
    misses the target (it undershoots on NAG). `under_skipping` (`nagjax sample --mod-rate`):
    the quantiles of a pass in which every eligible sublayer already skips at the rate (its tau
    set from the same pass), so that each threshold sees the skipping before it; the realised
    rate then lands near the target (one pass per rate)."""
    if not under_skipping:
        fn = calibration_fn(graphdef, mod, tuple(rates))
        return np.mean([np.asarray(fn(params, b)) for b in batches], axis=0)
    out = []
    for rate in rates:
        fn = calibration_fn(graphdef, mod, (rate,), under_skipping=True)
        out.append(np.mean([np.asarray(fn(params, b)) for b in batches], axis=0))
    return np.concatenate(out, axis=-1)
