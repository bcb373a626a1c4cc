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

import math

import numpy as np

from nagjax.config import ModConfig, ModelConfig, kept_tokens

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


def attnres_mix_flops(cfg: ModelConfig) -> float:
    """AttnRes row work of one depth-mixing read (SPEC 4): per buffer slot (all N are executed,
    masked ones included) key RMSNorm 4d, score 2d, weighted sum 2d, stream sum for stats 1d,
    softmax ~5. Runs before every sublayer and once before the final norm."""
    blocks = max(cfg.block_index_list) + 1
    n = 1 + math.ceil(2 * blocks / cfg.attnres.block_size)
    return n * (9.0 * cfg.d_model + 5.0)


def block_mlp_widths(cfg: ModelConfig) -> list[int]:
    """MLP hidden width per block (CascadeFormer taper, SPEC 5; uniform without it)."""
    from nagjax.model.taper import block_widths

    return block_widths(cfg)


def modulator_flops(cfg: ModelConfig) -> float:
    c = cfg.nag.modulator_channels
    return 2 * c * cfg.d_model + 6 * c  # C x d mat-vec, sigmoid, softmax-weighted sum, power


def executed_fractions(cfg: ModelConfig, seq_len: int, mod: ModConfig | None) -> np.ndarray:
    """[depth, 2] share of tokens that run each sublayer under MoD training (k/T), else 1."""
    out = np.ones((cfg.depth, 2))
    if mod is None or mod.rate == 0 or cfg.residual != "nag":
        return out
    keep = kept_tokens(seq_len, mod.rate) / seq_len
    for slot, name in enumerate(("attention", "mlp")):
        if mod.sublayers in ("both", name):
            out[mod.exempt_first_blocks:, slot] = keep
    return out


def forward_breakdown(cfg: ModelConfig, seq_len: int, *, causal_fraction: float = 0.5,
                      mod: ModConfig | None = None, executed=None) -> FlopBreakdown:
    """Forward FLOPs per token (averaged over the sequence) at context length `seq_len`.

    Counts executed work only. `mod` gives the training-time Mixture-of-Depths fractions (k/T per
    skipping sublayer, plus top-k, gather and scatter); `executed` ([depth, 2] fractions, e.g.
    measured at inference thresholds) overrides them and adds no gather/scatter. The modulator
    always runs on every token. With `mod.kv == "kept"` skipped tokens give no K/V (K/V
    projections and scores shrink with the kept share); with "all" every token's K/V is computed.
    """
    d, hd = cfg.d_model, cfg.head_dim
    gathered = executed is None and mod is not None and mod.rate > 0
    frac = np.asarray(executed if executed is not None else executed_fractions(cfg, seq_len, mod), float)
    kv_kept = mod is None or mod.kv == "kept"
    qo = 2.0 * 2 * d * cfg.n_heads * hd
    kv = 2.0 * 2 * d * cfg.kv_heads * hd
    scores = 2 * 2 * seq_len * cfg.n_heads * hd * causal_fraction  # QK^T and AV, all tokens
    attn_m = attn_s = mlp = resid = 0.0
    for (fa, fm), width in zip(frac, block_mlp_widths(cfg)):
        attn_m += qo * fa + kv * (fa if kv_kept else 1.0)
        attn_s += scores * (fa * fa if kv_kept else fa)
        mlp += 2.0 * 3 * d * width * fm
        for f in (fa, fm):
            if cfg.residual == "nag":
                resid += NAG_ROW_FLOPS * d * f + modulator_flops(cfg)
                if gathered and f < 1.0:
                    resid += 2 * d * f + math.log2(seq_len)  # gather + scatter, top-k
            else:
                resid += RMSNORM_ROW_FLOPS * d + RESIDUAL_ADD_FLOPS * d
                if cfg.residual == "attnres":
                    resid += attnres_mix_flops(cfg)
    if cfg.residual == "attnres":
        resid += attnres_mix_flops(cfg)  # the final aggregation before the final norm
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
