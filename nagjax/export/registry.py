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


def _register(table: dict, scheme: str, fn, what: str):
    existing = table.get(scheme)
    if existing is not None and existing is not fn:
        raise ValueError(f"residual scheme {scheme!r} already has {what} ({existing})")
    table[scheme] = fn
    return fn


def register_exporter(scheme: str, exporter: Exporter) -> Exporter:
    """Make `nagjax export --format hf` write scheme `scheme` with `exporter`."""
    return _register(EXPORTERS, scheme, exporter, "a Hugging Face exporter")


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
    return _register(LLAMA_INTO, scheme, into, "a Llama import rule")


def llama_import_for(scheme: str) -> LlamaInto:
    """The Llama import rule of `scheme`; a scheme without one is a ConfigError naming those with one."""
    if scheme not in LLAMA_INTO:
        raise ConfigError(f"import: model.residual={scheme!r}: importing a Llama into it is not defined "
                          f"({', '.join(sorted(LLAMA_INTO))})")
    return LLAMA_INTO[scheme]
