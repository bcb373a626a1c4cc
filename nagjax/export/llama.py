"""Pre-LN and LayerNorm Scaling as `LlamaForCausalLM` (docs/methods.md §0, §3).

The shared decoder is LLaMA's: RMSNorm (eps inside the square root), RoPE pairing the two halves
of each head (`rotate_half`, so q/k need no permutation), SwiGLU, no biases. nagjax keeps
projections as [d, heads, head_dim] / [heads, head_dim, d] and MLP matrices as [in, out]; LLaMA's
Linear weights are [out, in], hence the reshapes and transposes. LNS multiplies the output of both
pre-norms of block i by 1/sqrt(i + 1) (i the original block index, `model.block_ids`): folded
exactly into those norms' gains, since RMSNorm(x) * g * c = RMSNorm(x) * (g c).

A looped stack (`model.repeat`) exports as the plain Llama of its executed sequence: the shared
weights of block b are written once per executed layer that runs it, and LNS's factor comes from
the executed position, as in the looped forward.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from nagjax.config import ConfigError, ModelConfig
from nagjax.export.layers import per_executed
from nagjax.export.registry import register_exporter, register_llama_import


def llama_export(cfg: ModelConfig, params: dict, *, layernorm_scaling: bool) -> tuple[dict, dict]:
    """(config.json dict, {tensor name: float32 array}) of a Pre-LN / LNS model."""
    blocks = per_executed(cfg, params)
    widths = {b["mlp"]["w_gate"].shape[1] for b in blocks}
    if len(widths) != 1:
        raise ConfigError(f"model.taper={cfg.taper!r}: per-block MLP widths {sorted(widths)} do not fit "
                          "LlamaForCausalLM (one intermediate_size)")
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    tensors = {"model.embed_tokens.weight": params["embed"],
               "model.norm.weight": params["stream"]["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = params["head"]
    for i, (block_id, b) in enumerate(zip(cfg.executed_index_list, blocks, strict=True)):
        factor = 1.0 / math.sqrt(block_id + 1) if layernorm_scaling else 1.0
        attn, mlp, norms = b["attn"], b["mlp"], b["residual"]["norms"]
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": attn["wq"].reshape(d, h * hd).T,
            p + "self_attn.k_proj.weight": attn["wk"].reshape(d, kv * hd).T,
            p + "self_attn.v_proj.weight": attn["wv"].reshape(d, kv * hd).T,
            p + "self_attn.o_proj.weight": attn["wo"].reshape(h * hd, d).T,
            p + "mlp.gate_proj.weight": mlp["w_gate"].T,
            p + "mlp.up_proj.weight": mlp["w_up"].T,
            p + "mlp.down_proj.weight": mlp["w_down"].T,
            p + "input_layernorm.weight": norms[0]["scale"] * np.float32(factor),
            p + "post_attention_layernorm.weight": norms[1]["scale"] * np.float32(factor),
        })
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": d,
        "intermediate_size": widths.pop(),
        "num_hidden_layers": cfg.executed_depth,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    return config, {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}


register_exporter("prenorm", functools.partial(llama_export, layernorm_scaling=False))
register_exporter("lns", functools.partial(llama_export, layernorm_scaling=True))


def prenorm_from_llama(out: dict, norms: list, final, block_ids: list) -> dict:
    """Pre-LN is Llama: the pre-norm gains and the final norm as they are (the same function)."""
    del block_ids
    return {**out, "blocks.residual.norms.0.scale": norms[0], "blocks.residual.norms.1.scale": norms[1],
            "stream.final_norm.scale": final}


def lns_from_llama(out: dict, norms: list, final, block_ids: list) -> dict:
    """A Llama gain is what LNS applies times its factor 1/sqrt(block_id + 1) (folded in at export):
    the factor is divided out, so the model stays the same function."""
    factor = np.array([1 / math.sqrt(b + 1) for b in block_ids], np.float32)[:, None]
    return prenorm_from_llama(out, [n / factor for n in norms], final, block_ids)


register_llama_import("prenorm", prenorm_from_llama)
register_llama_import("lns", lns_from_llama)
