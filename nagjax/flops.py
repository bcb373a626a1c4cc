"""Analytic FLOP counts, MFU and iso-FLOP token budgets (SPEC 6).

Conventions (also in the README):
  * A multiply-add is 2 FLOPs. Training FLOPs per token = 3 x forward FLOPs (backward = 2 x forward).
  * Forward = 2 x (matmul parameters executed per token) + attention scores and values. The
    embedding lookup is not a matmul; the LM head is.
  * Causal attention counts half of the dense T x T work (`causal_fraction=0.5`, as MaxText); pass
    `causal_fraction=1.0` to count what a dense-mask implementation actually executes.
  * Per-token row work that is not a matmul is counted where a scheme adds it: NAG's fused update
    and modulator, the pre-norms of Pre-LN/LNS. Softmax, RoPE and the loss are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from nagjax.config import ModelConfig

# Elementwise FLOPs per feature of the row work, counted from the reference implementations.
RMSNORM_ROW_FLOPS = 4  # square, mean, scale, gain
RESIDUAL_ADD_FLOPS = 1
NAG_ROW_FLOPS = 17  # centre 2, <f,D> 2, <D,D> 2, project 2, RMS 2, scale 1, D+gu 2, RMS 2, scale 1, misc 1

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


def attention_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    return d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o and k, v


def mlp_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.mlp_width


def residual_row_flops(cfg: ModelConfig) -> float:
    """Row work per token per sublayer added by the residual scheme."""
    d = cfg.d_model
    if cfg.residual == "nag":
        c = cfg.nag.modulator_channels
        return NAG_ROW_FLOPS * d + 2 * c * d + 6 * c  # + modulator mat-vec, sigmoid/softmax mix
    return RMSNORM_ROW_FLOPS * d + RESIDUAL_ADD_FLOPS * d


def forward_breakdown(cfg: ModelConfig, seq_len: int, *, causal_fraction: float = 0.5) -> FlopBreakdown:
    """Forward FLOPs per token of a dense model at context length `seq_len`."""
    depth = cfg.depth
    scores = 2 * 2 * seq_len * cfg.n_heads * cfg.head_dim * causal_fraction  # QK^T and AV
    return FlopBreakdown(
        attention_matmuls=2.0 * attention_params(cfg) * depth,
        attention_scores=scores * depth,
        mlp=2.0 * mlp_params(cfg) * depth,
        head=2.0 * cfg.vocab_size * cfg.d_model,
        residual=residual_row_flops(cfg) * 2 * depth,
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return forward_breakdown(cfg, seq_len).train


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
