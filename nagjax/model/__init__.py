"""Flax NNX decoder with pluggable residual schemes."""

from nagjax.model.residual.base import StepContext
from nagjax.model.transformer import Transformer, build_model, count_params

__all__ = ["StepContext", "Transformer", "build_model", "count_params"]
