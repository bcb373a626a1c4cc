"""Mixture-of-Depths policy: for each use, how tokens are routed and whether skipped work is
really skipped (docs/methods.md §2). The one place that decides; every caller asks it.

`Routing` is what one forward pass does:

  * `topk` (training, real savings): per sequence, the k = ceil((1 - r) T) tokens with the largest
    signal, in their original order, are gathered, run through the sublayer and scattered back;
  * `threshold` (causal inference): a token executes iff its signal >= tau[layer, slot]; the
    sublayer runs densely and the scheme leaves skipped tokens exactly unchanged, or, with
    `skip_compute` (decoding), it runs under `lax.cond` only when some token executes it, so a
    skipped sublayer is really not computed (same outputs, bit for bit);
  * `dense`: every token executes (the exempt first blocks, a dense model).

`MoDPolicy` (built once per model from its `ModelConfig` and `ModConfig`, held by the model and
handed to the train step) answers per use:

  use                 routing
  ------------------  ------------------------------------------------------------------------
  training            top-k at the rate (+ the signal's quantile at the realised rate, for the
                      thresholds' EMA, when training skips)             `train_routing`
  evaluation          the trained thresholds if the run trains with MoD, else dense  `eval_routing`
  sampling/decoding   trained, calibrated or no thresholds (`sample_thresholds`); really skipped
                      or computed and discarded, active tokens only     `sample_routing`
  analysis sweep      thresholds at each target rate, plus the trained ones  `sweep_targets`,
                      `sweep_routing`
  calibration         a dense pass reporting quantiles, or one skipping at the rate while it
                      calibrates                                        `calibration_routing`
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import jax.numpy as jnp
import numpy as np

from nagjax.config import ModConfig, ModelConfig, require_skip_signal, scheme_declaration
from nagjax.model.layers import ATTENTION
from nagjax.model.mod import accounting
from nagjax.model.mod.thresholds import trained_thresholds


@dataclass(frozen=True)
class Routing:
    config: ModConfig | None = None  # which sublayers may skip, the exempt blocks, the K/V rule, r
    mode: Literal["dense", "topk", "threshold"] = "dense"
    # Thresholds of "threshold" mode (execute iff signal >= tau): [depth, 2] by position in the stack
    # (a looped stack, model.repeat > 1: by executed position, [executed depth, 2]; model/loops.py)
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


def segments(depth: int, routing: Routing) -> list[tuple[int, int, Routing]]:
    """Runs of blocks [start, stop) scanned together with their routing: the exempt first blocks
    (`mod.exempt_first_blocks`) run densely, the rest routed (static code paths, no per-block cond)."""
    if not routing.skips:
        return [(0, depth, routing)]
    exempt = min(routing.config.exempt_first_blocks, depth)
    parts = [(0, exempt, replace(routing, mode="dense")), (exempt, depth, routing)]
    return [p for p in parts if p[1] > p[0]]


def eligible_sublayers(depth: int, routing: Routing) -> np.ndarray:
    """[depth, 2] bool: the sublayers that may skip under `routing` (routed segments, `mod.sublayers`)."""
    out = np.zeros((depth, 2), bool)
    for start, stop, seg in segments(depth, routing):
        for slot in (0, 1):
            out[start:stop, slot] = seg.routes(slot)
    return out


@dataclass(frozen=True)
class MoDPolicy:
    """A model's Mixture-of-Depths policy. `mod` is None on a scheme without a skip signal (every
    use then routes densely) or when the model was built without a ModConfig."""

    model: ModelConfig
    mod: ModConfig | None = None
    signal: bool = False  # the scheme gives a skip signal (`SchemeDeclaration.skip_signal`)

    @classmethod
    def of(cls, model: ModelConfig, mod: ModConfig | None = None) -> MoDPolicy:
        """The policy of a model; `mod.rate > 0` on a scheme without a skip signal is a ConfigError."""
        signal = scheme_declaration(model.residual).skip_signal
        if mod is not None and mod.rate > 0 and not signal:
            require_skip_signal(model.residual, f"mod.rate={mod.rate} (Mixture-of-Depths; or mod.rate=0)")
        return cls(model=model, mod=mod if signal else None, signal=signal)

    # -- what the model's configuration says ----------------------------------------------------

    @property
    def skipping(self) -> bool:
        """Whether training skips tokens (`mod.rate > 0` on a scheme with a skip signal): then it
        trains thresholds, and evaluation and sampling use them."""
        return self.mod is not None and self.mod.rate > 0

    def require_signal(self, what: str) -> None:
        """A ConfigError unless the scheme gives a skip signal (`what` names the use that needs it)."""
        require_skip_signal(self.model.residual, what)

    def segments(self, routing: Routing) -> list[tuple[int, int, Routing]]:
        """The model's blocks cut into runs scanned together under `routing` (module `segments`)."""
        return segments(self.model.executed_depth, routing)

    def eligible_sublayers(self, routing: Routing) -> np.ndarray:
        """[depth, 2] bool: the model's sublayers that may skip under `routing`."""
        return eligible_sublayers(self.model.executed_depth, routing)

    def trained_thresholds(self, aux: dict):
        """The thresholds [depth, 2] a run trained, or None when it did not train with MoD."""
        return trained_thresholds(aux) if self.skipping else None

    # -- routing per use ------------------------------------------------------------------------

    def train_routing(self, seq_len: int | None = None) -> Routing:
        """Top-k at the configured rate (dense without MoD). Given the batch's `seq_len` (the train
        step) and when training skips, it also reports the quantile of the signal at the rate top-k
        realises on sequences that long (the thresholds' EMA), so thresholds skip what training skipped."""
        if self.mod is None:
            return DENSE
        rates = (accounting.realised_rate(seq_len, self.mod),) if self.skipping and seq_len is not None else ()
        return Routing(config=self.mod, mode="topk", quantile_rates=rates)

    def threshold_routing(self, tau, quantile_rates: tuple[float, ...] = (), *,
                          skip_compute: bool = False, active=None) -> Routing:
        """Causal routing: a token executes a sublayer iff its signal >= tau [depth, 2] (and it is
        `active`); `skip_compute` really skips a sublayer that no token executes (see `Routing`)."""
        if self.mod is None:
            raise ValueError("threshold routing needs the model's ModConfig (a scheme with a skip signal)")
        return Routing(config=self.mod, mode="threshold", tau=tau, quantile_rates=tuple(quantile_rates),
                       skip_compute=skip_compute, active=active)

    def eval_routing(self, aux: dict) -> Routing:
        """Evaluation (always causal): the trained thresholds if the run trains with MoD, else dense."""
        tau = self.trained_thresholds(aux)
        return DENSE if tau is None else self.threshold_routing(tau)

    def sample_routing(self, tau=None, *, skip_compute: bool = True, active=None) -> Routing:
        """Generation: dense without thresholds (`tau` None), else causal thresholds that really
        skip (`skip_compute`) or compute and discard (the reference path, same outputs); only
        `active` tokens execute skippable sublayers and are counted."""
        if tau is None:
            return Routing(active=active)
        return self.threshold_routing(tau, skip_compute=skip_compute, active=active)

    def sample_thresholds(self, aux: dict, *, rate: float | None = None, dense: bool = False,
                          calibrate: Callable[[float], np.ndarray] | None = None) -> tuple[Any, str]:
        """(thresholds [depth, 2] or None for dense, where they come from) for sampling: none on a
        scheme without a skip signal or when asked `dense`; every token executes at `rate` 0;
        `calibrate(rate)` at another `rate`; else the trained ones if the run trains with MoD."""
        if not self.signal or dense:
            return None, "none (dense)"
        if rate == 0:
            return np.full((self.model.executed_depth, 2), -np.inf), "r=0 (every token executes)"
        if rate is not None:
            return calibrate(rate), f"calibrated for r={rate:g} on validation data"
        tau = self.trained_thresholds(aux)
        if tau is None:
            return None, "none (dense)"
        return np.asarray(tau), f"trained (r={self.mod.rate:g})"

    def sweep_routing(self, tau) -> Routing:
        """The analysis sweep's routing at thresholds `tau` [depth, 2] (computed and discarded)."""
        return self.threshold_routing(tau)

    def sweep_targets(self, rates: tuple[float, ...], quantiles, aux: dict) -> list[tuple[str, float, Any]]:
        """(label, target rate, thresholds [depth, 2]) of each point of the analysis sweep: the
        calibrated `quantiles` [depth, 2, R] per rate (rate 0: -inf, exactly dense), and the
        trained thresholds if the run trains with MoD."""
        targets = [(f"r={r:g}", r, quantiles[..., i]) for i, r in enumerate(rates)]
        tau = self.trained_thresholds(aux)
        if tau is not None:
            targets.append(("trained", self.mod.rate, np.asarray(tau)))
        return [(label, rate, np.full_like(tau, -np.inf) if rate == 0.0 else tau) for label, rate, tau in targets]

    def calibration_routing(self, rates: tuple[float, ...], *, under_skipping: bool = False) -> Routing:
        """A pass that reports the signal's `rates`-quantiles per sublayer: a dense one (tau = -inf,
        every token executes), or `under_skipping` (one rate) one where every eligible sublayer
        already skips that rate, its tau set from the same pass (`nagjax.infer.calibration`)."""
        if under_skipping:
            if len(rates) != 1:
                raise ValueError("calibration under skipping takes one rate per pass")
            return Routing(config=self.mod, mode="threshold", quantile_rates=tuple(rates), self_calibrating=True)
        return self.threshold_routing(jnp.full((self.model.executed_depth, 2), -jnp.inf), rates)

    # -- FLOP accounting ------------------------------------------------------------------------

    def executed_fractions(self, seq_len: int) -> np.ndarray:
        """[depth, 2] share of tokens that run each sublayer under top-k training (k/T), else 1."""
        if not self.skipping:
            return np.ones((self.model.executed_depth, 2))
        return accounting.executed_fractions(self.eligible_sublayers(self.train_routing()), seq_len, self.mod)

    @property
    def kv_follows_execution(self) -> bool:
        """Whether a token gives K/V only where it executes attention (`mod.kv=kept`, or no MoD)."""
        return accounting.kv_follows_execution(self.mod)
