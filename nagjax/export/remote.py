"""NAG and AttnRes for `transformers` through `trust_remote_code` (docs/methods.md §1, §4).

No `transformers` architecture computes these residuals, so the export ships nagjax's forward
re-written in PyTorch (`modeling_nagjax.py`, `configuration_nagjax.py`, copied into the output
folder) with weights under nagjax's own names and layouts: `layers.<i>.<path>` for block i's
parameters (taper stages flattened), and the top-level ones (`embed`, `head`, `stream.*`) as they
are. The modelling file is the same for every scheme; `config.residual` picks its stream and
block residual. It honours padding masks and keeps a KV cache; the trained Mixture-of-Depths
thresholds of a run that trained with MoD are added by hf.py (`mod_config`), and the modelling code
routes and skips with them.

A looped stack (`model.repeat`) is exported unrolled: `layers.<p>` for executed position p holds
its block's shared weights and its pass's own residual parameters, and `block_ids` the executed
positions (AttnRes's source slots), so the same modelling file runs the loop (thresholds, like the
layers, are per executed position).
"""

from __future__ import annotations

import numpy as np

from nagjax.config import ModelConfig
from nagjax.export.layers import flat, per_executed
from nagjax.export.llama import prenorm_from_llama
from nagjax.export.registry import register_exporter, register_llama_import
from nagjax.model.residual.attnres import n_sources

CODE_FILES = ("configuration_nagjax.py", "modeling_nagjax.py")


def remote_code_export(cfg: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(config.json dict, {tensor name: float32 array}) for the nagjax modelling code."""
    blocks = per_executed(cfg, params)
    tensors = flat({k: v for k, v in params.items() if k not in ("blocks", "stages", "pass_residuals")})
    for i, b in enumerate(blocks):
        tensors.update(flat(b, f"layers.{i}."))
    config = {
        "architectures": ["NagjaxForCausalLM"],
        "model_type": "nagjax",
        "auto_map": {"AutoConfig": "configuration_nagjax.NagjaxConfig",
                     "AutoModelForCausalLM": "modeling_nagjax.NagjaxForCausalLM"},
        "residual": cfg.residual,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.executed_depth,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "mlp_widths": [int(b["mlp"]["w_gate"].shape[1]) for b in blocks],
        "block_ids": cfg.executed_index_list,
        "repeat": cfg.repeat,  # informational: the layers are the executed (unrolled) sequence
        "rope_theta": cfg.rope_theta,
        "norm_eps": cfg.norm_eps,
        "nag_eps": cfg.nag.eps,
        "nag_gate_floor": cfg.nag.gate_floor,
        "nag_modulator_channels": cfg.nag.modulator_channels,
        "attnres_block_size": cfg.attnres.block_size,
        "attnres_sources": n_sources(cfg),
        "tie_embeddings": cfg.tie_embeddings,  # head = embedding table (no `head` tensor)
        "tie_word_embeddings": False,  # transformers' own tying machinery is not used
        "torch_dtype": "float32",
    }
    return config, {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}


register_exporter("nag", remote_code_export)
register_exporter("attnres", remote_code_export)


def nag_from_llama(out: dict, norms: list, final, block_ids: list) -> dict:
    """NAG has no pre-norms: each gain scales the input rows of the matrices it fed (its sublayers
    read the unit-RMS direction, which is what RMSNorm hands them); its gates, modulator, encoder and
    head gains start fresh, and it has no final norm."""
    del final, block_ids
    out = dict(out)
    for name in ("wq", "wk", "wv"):
        out[f"blocks.attn.{name}"] = out[f"blocks.attn.{name}"] * norms[0][:, :, None, None]
    for name in ("w_gate", "w_up"):
        out[f"blocks.mlp.{name}"] = out[f"blocks.mlp.{name}"] * norms[1][:, :, None]
    return out


register_llama_import("nag", nag_from_llama)
register_llama_import("attnres", prenorm_from_llama)  # the norms and final norm kept; depth routers fresh
