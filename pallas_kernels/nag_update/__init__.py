"""Fused NAG magnitude/direction update.

`nag_update(..., impl="reference" | "pallas" | "pallas_gpu" | "pallas_tpu" | "auto")` is the public
entry (ops.py); with the default impl="reference" it is exactly `reference.nag_update`.
"""

from pallas_kernels.nag_update import reference
from pallas_kernels.nag_update.ops import IMPLS, nag_update, resolve_impl
from pallas_kernels.nag_update.reference import modulator

__all__ = ["IMPLS", "modulator", "nag_update", "reference", "resolve_impl"]
