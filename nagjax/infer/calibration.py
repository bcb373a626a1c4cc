"""Calibrating Mixture-of-Depths thresholds on a trained model (docs/methods.md §2.3).

tau per sublayer = a quantile of its skip signal over calibration tokens, the threshold that makes
"execute iff m >= tau" skip that rate. A pass runs the whole model under the routing its
`MoDPolicy` gives calibration (`MoDPolicy.calibration_routing`), which is why this lives above
the model: `nagjax sample --mod-rate`, `nagjax eval --mod-sweep` and benchmarks/decode.py call it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from nagjax.model.residual.base import StepContext


@functools.lru_cache(maxsize=16)
def calibration_fn(graphdef: nnx.GraphDef, rates: tuple[float, ...], *, under_skipping: bool = False):
    """jit: (params, batch) -> [depth, 2, R] quantiles of the signal, the thresholds that would skip
    each rate: in a dense pass (tau = -inf, every token executes), or `under_skipping` (one rate)
    in a pass where every sublayer already skips that rate of the tokens."""
    if under_skipping and len(rates) != 1:
        raise ValueError("calibration under skipping takes one rate per pass")

    def run(params, batch):
        model = nnx.merge(graphdef, params)
        routing = model.mod_policy.calibration_routing(tuple(rates), under_skipping=under_skipping)
        return model(batch["inputs"], ctx=StepContext(routing=routing))[1]["gate_quantiles"]

    return jax.jit(run)


def calibrate_thresholds(graphdef: nnx.GraphDef, params, batches, rates: tuple[float, ...], *,
                         under_skipping: bool = False) -> np.ndarray:
    """[depth, 2, R]: per sublayer, the rate-quantiles of the signal averaged over `batches`, for
    the model's own MoD configuration (its `mod_policy`).

    Dense (default; `nagjax eval --mod-sweep`): the quantiles of a pass where every token runs
    every sublayer. Skipping earlier sublayers shifts later signals, so the realised rate then
    misses the target (it undershoots on NAG). `under_skipping` (`nagjax sample --mod-rate`):
    the quantiles of a pass in which every eligible sublayer already skips at the rate (its tau
    set from the same pass), so that each threshold sees the skipping before it; the realised
    rate then lands near the target (one pass per rate)."""
    if not under_skipping:
        fn = calibration_fn(graphdef, tuple(rates))
        return np.mean([np.asarray(fn(params, b)) for b in batches], axis=0)
    out = []
    for rate in rates:
        fn = calibration_fn(graphdef, (rate,), under_skipping=True)
        out.append(np.mean([np.asarray(fn(params, b)) for b in batches], axis=0))
    return np.concatenate(out, axis=-1)
