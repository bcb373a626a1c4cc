"""Mixture-of-Depths' causal thresholds during training: the per-sublayer EMA of the batch's
signal quantile, saved in every checkpoint (docs/methods.md §2.3). Calibrating thresholds on a
trained model is `nagjax.infer.calibration`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
