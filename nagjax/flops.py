"""Analytic FLOP counts, MFU and iso-FLOP token budgets (docs/methods.md §6).

Conventions (also in the README):
  * A multiply-add is 2 FLOPs. Training FLOPs per token = 3 x forward FLOPs (backward = 2 x forward).
  * Forward = 2 x (matmul parameters executed per token) + attention scores and values. The
    embedding lookup is not a matmul; the LM head is.
  * Causal attention counts half of the dense T x T work (`causal_fraction=0.5`, as MaxText); pass
    `causal_fraction=1.0` to count what a dense-mask implementation actually executes.
  * A looped stack (`model.repeat`, nagjax/model/loops.py) counts every executed position: a block
    run R times costs R blocks of FLOPs (its parameters count once, `count_params`).
  * Per-token row work that is not a matmul is what each residual scheme declares in its registry
    entry (norms and adds, NAG's fused update and modulator, AttnRes mixing); Mixture-of-Depths'
    executed fractions, K/V rule and selection cost are what `MoDPolicy` answers (nagjax/model/mod/).
    Softmax, RoPE and the loss are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nagjax.config import ModConfig, ModelConfig
from nagjax.model.loops import executed_blocks
from nagjax.model.mod import MoDPolicy, selection_flops
from nagjax.model.residual import get_scheme
from nagjax.model.taper import block_widths

# Dense bf16 peak FLOP/s by device kind (substring match on `jax.Device.device_kind`, first hit).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e / "TPU v5 lite"
    ("TPU v4", 275e12),
)


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per token, by part."""

    attention_matmuls: float
    attention_scores: float
    mlp: float
    head: float
    residual: float

    @property
    def forward(self) -> float:
        return self.attention_matmuls + self.attention_scores + self.mlp + self.head + self.residual

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def block_mlp_widths(cfg: ModelConfig) -> list[int]:
    """MLP hidden width per block (CascadeFormer taper, docs/methods.md §5; uniform without it)."""
    return block_widths(cfg)


def executed_mlp_widths(cfg: ModelConfig) -> list[int]:
    """MLP hidden width per executed position (a looped block once per pass)."""
    widths = block_widths(cfg)
    return [widths[b] for b in executed_blocks(cfg)]


def forward_breakdown(cfg: ModelConfig, seq_len: int, *, causal_fraction: float = 0.5,
                      mod: ModConfig | None = None, executed=None) -> FlopBreakdown:
    """Forward FLOPs per token (averaged over the sequence) at context length `seq_len`.

    Counts executed work only. `mod` gives the training-time Mixture-of-Depths fractions (k/T per
    skipping sublayer, plus top-k, gather and scatter), as `MoDPolicy.of(cfg, mod)` answers them;
    `executed` ([executed depth, 2] fractions, e.g. measured at inference thresholds) overrides them and
    adds no gather/scatter. The skip signal
    (a scheme's row work) always runs on every token. Under the K/V rule `mod.kv == "kept"`
    skipped tokens give no K/V (K/V projections and scores shrink with the kept share); with "all"
    every token's K/V is computed.
    """
    scheme = get_scheme(cfg.residual)
    d, hd = cfg.d_model, cfg.head_dim
    policy = MoDPolicy.of(cfg, mod)
    gathered = executed is None and policy.skipping
    frac = np.asarray(executed if executed is not None else policy.executed_fractions(seq_len), float)
    kv_follows = policy.kv_follows_execution
    qo = 2.0 * 2 * d * cfg.n_heads * hd
    kv = 2.0 * 2 * d * cfg.kv_heads * hd
    scores = 2 * 2 * seq_len * cfg.n_heads * hd * causal_fraction  # QK^T and AV, all tokens
    attn_m = attn_s = mlp = resid = 0.0
    for (fa, fm), width in zip(frac, executed_mlp_widths(cfg), strict=True):
        attn_m += qo * fa + kv * (fa if kv_follows else 1.0)
        attn_s += scores * (fa * fa if kv_follows else fa)
        mlp += 2.0 * 3 * d * width * fm
        for f in (fa, fm):
            resid += scheme.sublayer_row_flops(cfg, f)
            if gathered and f < 1.0:
                resid += selection_flops(seq_len, d, f)
    resid += scheme.final_row_flops(cfg)
    return FlopBreakdown(
        attention_matmuls=attn_m,
        attention_scores=attn_s,
        mlp=mlp,
        head=2.0 * cfg.vocab_size * cfg.d_model,
        residual=resid,
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mod: ModConfig | None = None) -> float:
    return forward_breakdown(cfg, seq_len, mod=mod).train


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, or None if unknown (e.g. CPU)."""
    for key, value in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(tokens_per_second: float, flops_per_token: float, device_kind: str, n_devices: int) -> float | None:
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return tokens_per_second * flops_per_token / (peak * n_devices)


def tokens_for_budget(budget_flops: float, flops_per_token: float) -> float:
    """Iso-FLOP: a variant trains on budget / (training FLOPs per token) tokens."""
    return budget_flops / flops_per_token
