"""`nagjax import`: a Hugging Face folder as a nagjax workdir that `nagjax train --workdir` continues.

An importer reads one architecture (`config.json`'s `model_type`) and returns the nagjax config
overrides it implies and its tensors under nagjax's names, stacked over blocks
(`blocks.attn.wq` [depth, d, heads, head_dim], ...). Two are registered:

* `llama` (LlamaForCausalLM; also a nagjax Pre-LN/LNS export): the inverse of llama.py's mapping.
  Into Pre-LN the model is the same function (equal logits up to float32 rounding). Into another
  scheme (`--set model.residual=...`) every tensor whose shape fits carries over and the scheme's
  own parameters start fresh: LNS divides the norm gains by its 1/sqrt(i+1) (same function again:
  LNS's export folds that factor in, so an LNS export comes back as it was);
  NAG folds each pre-norm gain into the input rows of the sublayer it feeds (its sublayers read the
  unit-RMS direction, which is what RMSNorm hands them) and starts its gates, modulator, encoder
  gain and head gain fresh, and has no final norm; AttnRes keeps the norms and the final norm and
  starts its depth routers fresh (docs/methods.md, "Importing"). Each scheme's rule is registered
  beside its exporter (`register_llama_import` in export/registry.py; llama.py, remote.py), so a new
  scheme adds its own without touching this file.
* `nagjax` (the remote-code export of NAG and AttnRes): every tensor and, for a run trained with
  Mixture-of-Depths, its thresholds, back where they came from (exact).

The workdir gets a step-0 checkpoint built by the trainer's own state construction (fresh
optimiser state, `train.steps` from the experiment or `--set`), the resolved config, and the
tokenizer: the data must be tokenised with the imported model's tokenizer, so unless `data.source`
names shards built with it (`nagjax data --tokenizer FOLDER`), the embedded corpus is tokenised
with it into WORKDIR/data. An architecture or option nagjax cannot represent is a ConfigError that
names it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Callable

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from nagjax.config import Config, ConfigError, apply_overrides
from nagjax.data import corpus, mixture, pipeline
from nagjax.data.build import build_shards
from nagjax.data.tokenizer import load_tokenizer
from nagjax.export.registry import llama_import_for
from nagjax.model.mod import MoDPolicy
from nagjax.registry import get_experiment, load_experiments
from nagjax.train.checkpoint import CheckpointStore
from nagjax.train.state import training_state
from nagjax.train.trainer import resolve

# (hf config.json, {name: array}, residual wanted) -> (config overrides, {nagjax name: stacked array}, aux)
Importer = Callable[[dict, dict, str | None], tuple[list[str], dict, dict]]
IMPORTERS: dict[str, Importer] = {}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def register_importer(model_type: str, importer: Importer) -> Importer:
    """Make `nagjax import` read folders whose config.json has this `model_type`."""
    IMPORTERS[model_type] = importer
    return importer


def read_folder(folder: pathlib.Path) -> tuple[dict, dict]:
    """(config.json, {tensor name: float32 numpy}) of a Hugging Face folder (one or sharded safetensors)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors weights (pytorch_model.bin is not read: convert it "
                          "with transformers' save_pretrained(..., safe_serialization=True))")
    tensors = {}
    for f in files:
        tensors.update({k: np.asarray(v, np.float32) for k, v in load_file(str(f)).items()})
    return json.loads(config_path.read_text()), tensors


def _require(cond: bool, what: str, missing: list[str]) -> None:
    if not cond:
        missing.append(what)


def _llama_checks(hf: dict) -> None:
    """A ConfigError naming every Llama option nagjax's decoder cannot represent."""
    missing: list[str] = []
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (nagjax: SwiGLU with silu)", missing)
    _require(not hf.get("attention_bias", False), "attention_bias=true (nagjax has no biases)", missing)
    _require(not hf.get("mlp_bias", False), "mlp_bias=true (nagjax has no biases)", missing)
    rope = hf.get("rope_scaling") or {}
    rope_params = hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type", "default")
    _require(kind == "default", f"rope scaling {kind!r} (nagjax: plain RoPE)", missing)
    _require(hf.get("head_dim", d // h) == d // h,
             f"head_dim={hf.get('head_dim')} != hidden_size / num_attention_heads = {d // h}", missing)
    _require(not hf.get("sliding_window"), f"sliding_window={hf.get('sliding_window')} (nagjax: full causal)", missing)
    if missing:
        raise ConfigError(f"import: this {hf.get('model_type')} model has what nagjax cannot represent: "
                          + "; ".join(missing))


def _stack(tensors: dict, name: str, depth: int, fn=lambda a: a) -> np.ndarray:
    try:
        return np.stack([fn(tensors[name.format(i)]) for i in range(depth)])
    except KeyError as e:
        raise ConfigError(f"import: tensor {e.args[0]!r} is missing from the safetensors") from None


def llama_import(hf: dict, tensors: dict, residual: str | None) -> tuple[list[str], dict, dict]:
    """LlamaForCausalLM (or a nagjax Pre-LN/LNS export) -> nagjax overrides and stacked tensors."""
    _llama_checks(hf)
    block = hf.get("nagjax") or {}
    saved = block.get("residual")
    residual = residual or saved or "prenorm"
    d, h, depth = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    kv, hd = hf.get("num_key_value_heads") or h, d // h
    block_ids = list(block.get("block_ids") or range(depth))
    tied = bool(hf.get("tie_word_embeddings", False))
    overrides = [f"model.residual={residual}", f"model.vocab_size={hf['vocab_size']}", f"model.d_model={d}",
                 f"model.depth={depth}", f"model.n_heads={h}", f"model.n_kv_heads={kv}",
                 f"model.d_ff={hf['intermediate_size']}", f"model.rope_theta={float(hf.get('rope_theta', (hf.get('rope_parameters') or {}).get('rope_theta', 10000.0)))}",
                 f"model.norm_eps={hf.get('rms_norm_eps', 1e-6)}", f"model.tie_embeddings={str(tied).lower()}"]
    if block_ids != list(range(depth)):
        overrides.append("model.block_ids=" + ",".join(map(str, block_ids)))
    into = llama_import_for(residual)  # where the scheme puts the norm gains (export/registry.py)
    L = "model.layers.{}."
    norms = [_stack(tensors, L + n + ".weight", depth) for n in ("input_layernorm", "post_attention_layernorm")]
    out = {
        "embed": tensors["model.embed_tokens.weight"],
        "blocks.attn.wq": _stack(tensors, L + "self_attn.q_proj.weight", depth, lambda w: w.T.reshape(d, h, hd)),
        "blocks.attn.wk": _stack(tensors, L + "self_attn.k_proj.weight", depth, lambda w: w.T.reshape(d, kv, hd)),
        "blocks.attn.wv": _stack(tensors, L + "self_attn.v_proj.weight", depth, lambda w: w.T.reshape(d, kv, hd)),
        "blocks.attn.wo": _stack(tensors, L + "self_attn.o_proj.weight", depth, lambda w: w.T.reshape(h, hd, d)),
        "blocks.mlp.w_gate": _stack(tensors, L + "mlp.gate_proj.weight", depth, np.transpose),
        "blocks.mlp.w_up": _stack(tensors, L + "mlp.up_proj.weight", depth, np.transpose),
        "blocks.mlp.w_down": _stack(tensors, L + "mlp.down_proj.weight", depth, np.transpose),
    }
    if not tied:
        out["head"] = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    return overrides, into(out, norms, tensors["model.norm.weight"], block_ids), {}


def nagjax_import(hf: dict, tensors: dict, residual: str | None) -> tuple[list[str], dict, dict]:
    """A nagjax remote-code export (NAG, AttnRes) -> its own parameters, exactly."""
    saved = hf.get("residual")
    if residual is not None and saved != residual:
        raise ConfigError(f"import: this export is model.residual={saved!r}; it imports as itself only "
                          f"(got model.residual={residual!r}; import a Pre-LN/Llama folder to change scheme)")
    depth, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    widths = set(hf.get("mlp_widths") or [])
    if len(widths) > 1:
        raise ConfigError(f"import: per-block MLP widths {sorted(widths)} (a CascadeFormer taper) cannot be "
                          "imported yet: nagjax import reads one MLP width")
    overrides = [f"model.residual={saved}", f"model.vocab_size={hf['vocab_size']}", f"model.d_model={d}",
                 f"model.depth={depth}", f"model.n_heads={h}", f"model.n_kv_heads={hf['num_key_value_heads']}",
                 f"model.rope_theta={hf['rope_theta']}", f"model.norm_eps={hf['norm_eps']}",
                 f"model.tie_embeddings={str(bool(hf.get('tie_embeddings'))).lower()}"]
    if widths:
        overrides.append(f"model.d_ff={widths.pop()}")
    if hf.get("block_ids") and list(hf["block_ids"]) != list(range(depth)):
        overrides.append("model.block_ids=" + ",".join(map(str, hf["block_ids"])))
    if saved == "nag":
        overrides += [f"model.nag.eps={hf['nag_eps']}", f"model.nag.gate_floor={hf['nag_gate_floor']}",
                      f"model.nag.modulator_channels={hf['nag_modulator_channels']}"]
    if saved == "attnres":
        overrides.append(f"model.attnres.block_size={hf['attnres_block_size']}")
    aux = {}
    if hf.get("mod_thresholds"):
        rate = (hf.get("nagjax") or {}).get("mod_rate", 0.0)
        overrides += [f"mod.rate={rate}", f"mod.sublayers={hf['mod_sublayers']}",
                      f"mod.exempt_first_blocks={hf['mod_exempt_first_blocks']}", f"mod.kv={hf['mod_kv']}"]
        aux["mod_tau"] = np.asarray(hf["mod_thresholds"], np.float32)
    out = {k: v for k, v in tensors.items() if not k.startswith("layers.")}
    names = {k.split(".", 2)[2] for k in tensors if k.startswith("layers.")}
    for name in names:
        out["blocks." + name] = _stack(tensors, "layers.{}." + name, depth)
    return overrides, out, aux


register_importer("llama", llama_import)
register_importer("nagjax", nagjax_import)


def _set_params(params, flat: dict[str, np.ndarray]) -> list[str]:
    """Write `flat` {dotted nagjax name: array} into a parameter state in place; returns the names
    of the parameters left at their fresh initialisation. A tensor whose shape does not fit, or
    that has no place, is a ConfigError."""
    pure = nnx.to_pure_dict(params)
    fresh, used = [], set()

    def visit(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if name not in flat:
            fresh.append(name)
            return leaf
        used.add(name)
        value = flat[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConfigError(f"import: {name}: the folder's tensor has shape {tuple(value.shape)}, nagjax's "
                              f"parameter {tuple(leaf.shape)}")
        return jax.numpy.asarray(value, leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(visit, pure)
    unused = sorted(set(flat) - used)
    if unused:
        raise ConfigError(f"import: tensors with no place in the nagjax model: {', '.join(unused[:8])}")
    nnx.replace_by_pure_dict(params, pure)
    return fresh


def _tokenizer_source(folder: pathlib.Path, config: Config, workdir: pathlib.Path) -> tuple[Config, str]:
    """The data config that tokenises with the imported model's tokenizer, and what was done."""
    found = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    user_data = config.data.source != "embedded" or config.data.sources
    if not found:
        if user_data:
            return config, "no tokenizer in the folder: the data's own tokenizer is used"
        raise ConfigError(f"import: {folder} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the "
                          "model's tokenizer there, or pass --set data.source=SHARDS built with it")
    theirs = load_tokenizer(folder)
    if user_data:
        ours = mixture.tokenizer_of(config.data)
        if ours.sha256() != theirs.sha256():
            raise ConfigError(f"import: the data ({config.data.source or config.data.sources}) was tokenised "
                              f"with {ours.path}, not the model's {found[0].name}: rebuild it with `nagjax data "
                              f"--tokenizer {folder}`")
        return config, f"data {config.data.source or config.data.sources} (tokenised with the model's tokenizer)"
    if mixture.tokenizer_of(config.data).sha256() == theirs.sha256():
        return config, "the embedded corpus (already tokenised with this tokenizer)"
    shards = workdir / "data"
    if not (shards / "meta.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            docs = pathlib.Path(tmp) / "embedded.jsonl"
            with docs.open("w") as f:
                for split in ("train", "validation"):
                    for doc in corpus.embedded_documents(split):
                        f.write(json.dumps({"text": doc}) + "\n")
            build_shards([str(docs)], shards, tokenizer=str(folder), val_fraction=0.05)
    return config.replace(data=dataclasses.replace(config.data, source=str(shards.absolute()))), f"the embedded corpus tokenised with the model's tokenizer into {shards}"


def import_folder(folder: str | pathlib.Path, workdir: str | pathlib.Path, *, experiment: str | None = None,
                  overrides: list[str] = (), experiments_dir: list[str] = ()) -> dict:
    """Write a step-0 nagjax workdir from a Hugging Face folder; returns a summary."""
    folder, workdir = pathlib.Path(folder), pathlib.Path(workdir)
    hf, tensors = read_folder(folder)
    model_type = hf.get("model_type")
    if model_type not in IMPORTERS:
        arch = ", ".join(hf.get("architectures") or [str(model_type)])
        raise ConfigError(f"import: {arch} (model_type={model_type!r}) cannot be imported; nagjax reads "
                          f"{', '.join(sorted(IMPORTERS))} (LlamaForCausalLM, nagjax exports)")
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ConfigError(f"import: {workdir} already holds checkpoints; import into a new workdir")
    load_experiments(list(experiments_dir))
    base = get_experiment(experiment or "quickstart")
    asked = apply_overrides(base, list(overrides))
    wanted = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.residual=")), None)
    model_overrides, flat, aux = IMPORTERS[model_type](hf, tensors, wanted)
    config = apply_overrides(asked, model_overrides + [o for o in overrides if not o.startswith("model.residual=")])
    config = config.replace(name=f"import-{folder.absolute().name}")
    config, data_note = _tokenizer_source(folder, config, workdir)
    config = resolve(config)
    spec = training_state(config)
    state = jax.jit(spec.init)()
    fresh = _set_params(state["params"], flat)
    if aux:
        if not MoDPolicy.of(config.model, config.mod).skipping:
            raise ConfigError("import: the export carries Mixture-of-Depths thresholds but the config does not "
                              "train with MoD")
        state["aux"]["mod_tau"] = jax.numpy.asarray(aux["mod_tau"])
    data_state = pipeline.train_iterator(config.data).get_state()
    store = CheckpointStore(workdir / "checkpoints")
    store.save(0, state, data_state, config.to_dict())
    store.close()
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    mixture.keep_with_run(mixture.tokenizer_of(config.data), workdir)
    return {"config": config, "fresh": fresh, "data": data_note, "model_type": model_type}
