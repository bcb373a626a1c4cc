"""Mixture-of-Depths' mechanism: run one sublayer for the tokens a `Routing` selects.

`run_routed` is what a scheme with a skip signal (NAG) calls for a routed sublayer: top-k
selection (`select_topk`) with rows moved in and out by gathers in both directions of autodiff
(custom VJPs: XLA scatters are slow on GPUs), or causal thresholds, computed and discarded or
really skipped under `lax.cond`. `skip_stats` are the per-sublayer statistics of a skip signal.
Which routing a use gets is `MoDPolicy`'s decision (policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from nagjax.model.layers import ATTENTION, KVSource
from nagjax.model.mod.accounting import kept_tokens
from nagjax.model.mod.policy import Routing


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
