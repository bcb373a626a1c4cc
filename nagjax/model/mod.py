"""Mixture-of-Depths (docs/methods.md §2): every routing decision, in one place.

A scheme with a skip signal (`Scheme.skip_signal`, NAG's modulator m) hands its sublayer to
`run_routed`, which decides which tokens execute it:

  * `topk` (training, real savings): per sequence, the k = ceil((1 - r) T) tokens with the largest
    signal, in their original order, are gathered, run through the sublayer and scattered back;
  * `threshold` (causal inference): a token executes iff its signal >= tau[layer, slot]; the
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

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax.config import ConfigError, ModConfig, ModelConfig
from nagjax.model.layers import ATTENTION, KVSource


def kept_tokens(seq_len: int, rate: float, multiple: int = 1) -> int:
    """Tokens per sequence that run a skipping sublayer: k = ceil((1 - r) T), at least 1, rounded
    up to a multiple of `multiple` (`mod.kept_multiple`: whole tiles for the GPU's matmul and
    flash-attention kernels) and at most T. The FLOP counter counts this k: the executed work.
    A k rounded up to T runs the sublayer densely, without the selection (`run_routed`)."""
    k = max(1, math.ceil((1.0 - rate) * seq_len - 1e-9))
    return min(seq_len, -(-k // multiple) * multiple)


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
    # Thresholds of "threshold" mode (execute iff signal >= tau): [depth, 2] by position in the stack
    # (as the training EMA writes them); `Transformer.run_blocks` hands each block its row [2].
    tau: Any = None
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


def realised_rate(seq_len: int, mod: ModConfig) -> float:
    """The skip rate top-k training realises at this length: 1 - k/T with k rounded up."""
    return 1.0 - kept_tokens(seq_len, mod.rate, mod.kept_multiple) / seq_len


def training_routing(mod: ModConfig | None, *, calibrate: bool = False, seq_len: int | None = None) -> Routing:
    """Top-k at the configured rate; `calibrate` also reports the quantile of the signal at the rate
    top-k realises on sequences of `seq_len` (the training step's threshold EMA), so thresholds
    skip what training skipped."""
    if mod is None:
        return DENSE
    rates = (realised_rate(seq_len, mod),) if calibrate else ()
    return Routing(config=mod, mode="topk", quantile_rates=rates)


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


@dataclass(frozen=True)
class Selection:
    """The k tokens per sequence a top-k routing keeps, and the maps between tokens and rows.

    `idx` [b, k]: the kept tokens' positions, ascending (order, hence causality, preserved);
    `row` [b, t]: for a kept token, its row in the gathered [b, k] arrays; `keep` [b, t] bool.
    Moving rows in and out (`take`, `put`) uses gathers only, in both directions of autodiff:
    XLA scatters (the transpose of a plain gather) are slow on GPUs.
    """

    idx: jax.Array
    row: jax.Array
    keep: jax.Array

    def take(self, x):
        """x [b, t, ...] -> its kept rows [b, k, ...]."""
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return gather_tokens(x, self.idx)
        return _take_rows(x, self.idx, self.row, self.keep)

    def put(self, base, rows):
        """`base` [b, t, ...] with the kept tokens' entries replaced by `rows` [b, k, ...]."""
        return _put_rows(base, rows.astype(base.dtype), self.idx, self.row, self.keep)


def select_topk(signal_bt, k: int) -> Selection:
    """The k largest signals per sequence, ties to the earlier token (as `lax.top_k`).

    One sort of the values finds the k-th largest; the kept tokens' positions come from a binary
    search over the running count of kept tokens, so no top-k of (value, index) pairs and no
    second sort of the indices is needed (the same selection, cheaper at T = 2048-8192).
    """
    t = signal_bt.shape[1]
    signal_bt = jnp.where(jnp.isnan(signal_bt), -jnp.inf, signal_bt)  # a NaN never wins, and k stay k
    kth = jnp.sort(signal_bt, axis=-1)[:, t - k, None]  # [b, 1]
    above, tie = signal_bt > kth, signal_bt == kth
    ties_wanted = k - jnp.sum(above, axis=-1, keepdims=True)
    keep = above | (tie & (jnp.cumsum(tie, axis=-1) <= ties_wanted))
    count = jnp.cumsum(keep, axis=-1, dtype=jnp.int32)  # kept tokens up to and including t
    # an unrolled binary search: no while loop, whose every trip would cost a GPU a host round trip
    find = lambda c: jnp.searchsorted(c, jnp.arange(1, k + 1, dtype=jnp.int32), method="scan_unrolled")
    idx = jax.vmap(find)(count)
    return Selection(idx=jnp.minimum(idx, t - 1).astype(jnp.int32), row=count - 1, keep=keep)


def gather_tokens(x, idx):
    """x [b, t, ...] at the positions idx [b, k] of each sequence: [b, k, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _where_kept(keep, a, b):
    ndim = max(jnp.ndim(a), jnp.ndim(b))
    return jnp.where(keep.reshape(keep.shape + (1,) * (ndim - 2)), a, b)


@jax.custom_vjp
def _take_rows(x, idx, row, keep):
    return gather_tokens(x, idx)


def _take_rows_fwd(x, idx, row, keep):
    return gather_tokens(x, idx), (idx, row, keep)


def _take_rows_bwd(res, ct_rows):
    idx, row, keep = res  # each kept token is exactly one row: the transpose is a gather too
    return _where_kept(keep, gather_tokens(ct_rows, jnp.maximum(row, 0)), jnp.zeros((), ct_rows.dtype)), None, None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def _put_rows(base, rows, idx, row, keep):
    return _where_kept(keep, gather_tokens(rows, jnp.maximum(row, 0)), base)


def _put_rows_fwd(base, rows, idx, row, keep):
    return _put_rows(base, rows, idx, row, keep), (idx, keep)


def _put_rows_bwd(res, ct):
    idx, keep = res
    zero = jnp.zeros((), ct.dtype)
    return _where_kept(keep, zero, ct), gather_tokens(ct, idx), None, None, None


_put_rows.defvjp(_put_rows_fwd, _put_rows_bwd)


def run_routed(routing: Routing, signal_bt, state: dict, positions_bt, sublayer: Callable, slot: int,
               *, read: Callable, apply: Callable) -> tuple[dict, jax.Array]:
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
    writes them first, outside the branch, with `sublayer.record_kv(x_btd, positions_bt)`; its
    call then reads what was recorded.
    """
    attention_kv_all = slot == ATTENTION and routing.config.kv == "all"
    if routing.mode == "topk":
        mod = routing.config
        kept = kept_tokens(signal_bt.shape[1], mod.rate, mod.kept_multiple)
        if kept == signal_bt.shape[1]:  # k rounded up to the whole sequence: nothing to select
            return apply(sublayer(read(state), positions_bt), state, None), jnp.ones(signal_bt.shape, bool)
        sel = select_topk(signal_bt, kept)
        rows = {k: sel.take(v) for k, v in state.items()}
        kv = KVSource(x_btd=read(state), positions_bt=positions_bt) if attention_kv_all else None
        f = sublayer(read(rows), sel.take(positions_bt), kv=kv)
        new_rows = apply(f, rows, None)
        return {k: sel.put(state[k], new_rows[k]) for k in state}, sel.keep
    if routing.mode != "threshold":
        raise ValueError(f"run_routed: routing mode {routing.mode!r} does not skip")
    if routing.self_calibrating:
        tau = jnp.quantile(signal_bt.reshape(-1), routing.quantile_rates[0])
    else:
        tau = jnp.asarray(routing.tau)[slot]  # this block's row (run_blocks)
    executed = signal_bt >= tau
    if routing.active is not None:
        executed = executed & routing.active
    kv = KVSource(valid_bt=executed) if slot == ATTENTION and not attention_kv_all else None
    x_btd = read(state)
    if not routing.skip_compute:
        return apply(sublayer(x_btd, positions_bt, kv=kv), state, executed), executed

    def run():
        return apply(sublayer(x_btd, positions_bt, kv=kv), state, executed)

    if attention_kv_all and hasattr(sublayer, "record_kv"):
        # Every token gives K/V whether or not it runs attention: write them once, before the
        # branch, so that neither branch writes the cache (a cache written inside a lax.cond is
        # copied in and out of it, a cost that grows with the cache length).
        sublayer.record_kv(x_btd, positions_bt)
        return jax.lax.cond(jnp.any(executed), run, lambda: state), executed
    return _cond(jnp.any(executed), run, lambda: state, sublayer), executed


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
        if routing.mode == "dense":  # an exempt block never skips: no threshold, no sort to pay for
            stats["gate_quantiles"] = jnp.zeros((len(routing.quantile_rates),), jnp.float32)
        else:
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
    if not skipping(model, mod):
        return np.ones((model.depth, 2))
    keep = kept_tokens(seq_len, mod.rate, mod.kept_multiple) / seq_len
    return np.where(eligible_sublayers(model.depth, training_routing(mod)), keep, 1.0)


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


def trained_thresholds(aux: dict):
    """The thresholds [depth, 2] a run trained (its checkpoint's accumulators)."""
    return aux["mod_tau"]


def update_thresholds(aux: dict, quantile_ld, decay: float) -> dict:
    """tau <- EMA of the batch's r-quantile of the signal per sublayer (`mod.threshold_ema`), so
    that "execute iff m >= tau" realises the training skip rate causally. The first update takes
    the batch value (no bias correction needed)."""
    first = aux["mod_tau_updates"] == 0
    tau = jnp.where(first, quantile_ld, decay * aux["mod_tau"] + (1.0 - decay) * quantile_ld)
    return {**aux, "mod_tau": tau, "mod_tau_updates": aux["mod_tau_updates"] + 1}


@functools.lru_cache(maxsize=16)
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
