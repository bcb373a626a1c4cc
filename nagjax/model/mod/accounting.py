"""Mixture-of-Depths' executed work: how many tokens a top-k sublayer keeps, the executed
fractions the FLOP counter charges, the K/V rule's effect, and the selection's own cost."""

from __future__ import annotations

import math

import numpy as np

from nagjax.config import ModConfig


def kept_tokens(seq_len: int, rate: float, multiple: int = 1) -> int:
    """Tokens per sequence that run a skipping sublayer: k = ceil((1 - r) T), at least 1, rounded
    up to a multiple of `multiple` (`mod.kept_multiple`: whole tiles for the GPU's matmul and
    flash-attention kernels) and at most T. The FLOP counter counts this k: the executed work.
    A k rounded up to T runs the sublayer densely, without the selection (`run_routed`)."""
    k = max(1, math.ceil((1.0 - rate) * seq_len - 1e-9))
    return min(seq_len, -(-k // multiple) * multiple)


def realised_rate(seq_len: int, mod: ModConfig) -> float:
    """The skip rate top-k training realises at this length: 1 - k/T with k rounded up."""
    return 1.0 - kept_tokens(seq_len, mod.rate, mod.kept_multiple) / seq_len


def executed_fractions(eligible: np.ndarray, seq_len: int, mod: ModConfig) -> np.ndarray:
    """[depth, 2] share of tokens that run each sublayer under top-k training: k/T where a
    sublayer is `eligible` ([depth, 2] bool) to skip, else 1 (`MoDPolicy.executed_fractions`)."""
    keep = kept_tokens(seq_len, mod.rate, mod.kept_multiple) / seq_len
    return np.where(eligible, keep, 1.0)


def kv_follows_execution(mod: ModConfig | None) -> bool:
    """Whether a token gives K/V only where it executes attention (`mod.kv=kept`, or no MoD)."""
    return mod is None or mod.kv == "kept"


def selection_flops(seq_len: int, d_model: int, executed: float) -> float:
    """Per-token cost of routing one sublayer by top-k: gather and scatter of the kept rows, and
    the top-k itself (~log2 T comparisons)."""
    return 2 * d_model * executed + math.log2(seq_len)
