"""The residual-scheme interface: the only thing that differs between Pre-LN, LNS and NAG.

A scheme has two parts:
  * a `Stream` (one per model) that turns token embeddings into the initial stream state and the
    final state into logits, and owns the embedding-side/head-side parameters of the scheme;
  * a `BlockResidual` (one per Transformer block, stacked and scanned with the block) that, given the
    stream state, the token positions and one sublayer as a function, returns the new state. The
    sublayer maps what the scheme feeds it ([b, t, d], with positions [b, t]) to its output.

The state is a dict of arrays (a pytree, so it can be the carry of `lax.scan`). Adding a scheme
means one new file implementing these two classes and one line in `residual/__init__.py`; the
transformer and the trainer do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import jax

from nagjax.config import ModConfig

State = dict[str, jax.Array]
# sublayer(x_btd, positions_bt, **kv) -> f_btd. Positions are the tokens' original positions, so a
# scheme may run a sublayer on a subset of tokens (Mixture-of-Depths) with correct RoPE/causality;
# attention also takes kv_btd / kv_positions_bt / kv_valid_bt (see layers.Attention), the MLP
# ignores them.
Sublayer = Callable[..., jax.Array]

ATTENTION, MLP = 0, 1  # sublayer slot within a block


@dataclass(frozen=True)
class StepContext:
    """Per-call values that are not parameters (traced scalars are fine)."""

    nag_alpha_scale: jax.Array | float = 1.0  # linear alpha warm-up factor (NAG only)
    # Mixture-of-Depths (NAG only). The Transformer sets `mod` for the blocks that may skip.
    mod: ModConfig | None = None
    mod_mode: Literal["topk", "threshold"] = "topk"  # training gather/scatter | causal inference
    mod_tau: Any = None  # [depth, 2] thresholds for "threshold" mode: execute iff m >= tau
    quantile_rates: tuple[float, ...] = ()  # report these quantiles of m (threshold calibration)


class Stream(Protocol):
    def encode(self, embeddings_btd: jax.Array) -> State: ...

    def logits(self, state: State, head_vd: jax.Array) -> jax.Array: ...

    def embedding_table(self, raw_vd: jax.Array) -> jax.Array: ...

    def stream_rms(self, state: State) -> jax.Array: ...


class BlockResidual(Protocol):
    def __call__(
        self,
        state: State,
        sublayer: Sublayer,
        positions_bt: jax.Array,
        slot: int,
        block_index: jax.Array,
        ctx: StepContext,
    ) -> tuple[State, dict[str, jax.Array]]: ...
