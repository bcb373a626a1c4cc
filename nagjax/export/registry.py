"""Which exporter writes each residual scheme as a Hugging Face folder (`nagjax export --format hf`),
and how `nagjax import` turns a Llama's sublayer weights into each scheme's.

An exporter is `(cfg, numpy params) -> (config.json dict, {tensor name: float32 array})`. Each
exporter module registers the schemes it writes (llama.py: Pre-LN, LNS; remote.py: NAG, AttnRes);
a new scheme's exporter registers itself the same way, here in `export/`, so the model never
imports the export code.
"""

from __future__ import annotations

from typing import Callable

from nagjax.config import ConfigError, ModelConfig

Exporter = Callable[[ModelConfig, dict], tuple[dict, dict]]

EXPORTERS: dict[str, Exporter] = {}


def register_exporter(scheme: str, exporter: Exporter) -> Exporter:
    """Make `nagjax export --format hf` write scheme `scheme` with `exporter`."""
    existing = EXPORTERS.get(scheme)
    if existing is not None and existing is not exporter:
        raise ValueError(f"residual scheme {scheme!r} already has a Hugging Face exporter ({existing})")
    EXPORTERS[scheme] = exporter
    return exporter


def exporter_for(scheme: str) -> Exporter:
    """The exporter of `scheme`; a scheme without one is a ConfigError naming the ones that have one."""
    if scheme not in EXPORTERS:
        raise ConfigError(f"model.residual={scheme!r}: no Hugging Face exporter is registered for this "
                          f"scheme (nagjax/export/registry.py; exportable: {', '.join(sorted(EXPORTERS))})")
    return EXPORTERS[scheme]


# (stacked Llama tensors under nagjax's names, [pre-attention, pre-MLP] norm gains [depth, d], final
# norm gain [d], original block ids) -> the scheme's tensors: where the norm gains go is what differs.
LlamaInto = Callable[[dict, list, object, list], dict]

LLAMA_INTO: dict[str, LlamaInto] = {}


def register_llama_import(scheme: str, into: LlamaInto) -> LlamaInto:
    """Make `nagjax import` of a Llama folder able to initialise scheme `scheme` (`into` places the
    norm gains; every other Llama tensor whose shape fits carries over as it is)."""
    existing = LLAMA_INTO.get(scheme)
    if existing is not None and existing is not into:
        raise ValueError(f"residual scheme {scheme!r} already has a Llama import rule ({existing})")
    LLAMA_INTO[scheme] = into
    return into


def llama_import_for(scheme: str) -> LlamaInto:
    """The Llama import rule of `scheme`; a scheme without one is a ConfigError naming those with one."""
    if scheme not in LLAMA_INTO:
        raise ConfigError(f"import: model.residual={scheme!r}: importing a Llama into it is not defined "
                          f"({', '.join(sorted(LLAMA_INTO))})")
    return LLAMA_INTO[scheme]
