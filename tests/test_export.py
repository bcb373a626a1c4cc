"""`nagjax export --format hf`: safetensors + config.json + tokenizer, Pre-LN/LNS as
LlamaForCausalLM (LNS folded into the norm gains), NAG/AttnRes with remote modelling code; where
torch and transformers are installed, the exported model's logits equal nagjax's (float32)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_RUN
from nagjax.analysis.diagnostics import load_run
from nagjax.cli import main
from nagjax.config import Config, apply_overrides
from nagjax.train.checkpoint import CheckpointStore
from nagjax.train.state import training_state
from nagjax.train.trainer import resolve

CASES = {
    "prenorm": [],
    "lns": ["model.n_kv_heads=1", "model.tie_embeddings=true", "model.block_ids=1,3"],
    "nag": ["model.n_kv_heads=1"],
    "attnres": ["model.attnres.block_size=3", "model.block_ids=0,2"],
}


def saved_run(residual: str, workdir, overrides=None):
    """A checkpoint of a tiny model, written as the trainer writes one, whose every parameter is
    random (so that norm gains are not 1, AttnRes queries not 0, ...); nothing is compiled."""
    cfg = resolve(apply_overrides(Config(), [*TINY_RUN, f"model.residual={residual}",
                                                    *(CASES[residual] if overrides is None else overrides)]))
    rng = np.random.default_rng(7)

    def fill(path, a):
        if a.dtype.kind != "f":
            return np.zeros(a.shape, a.dtype)
        names = {getattr(k, "key", None) for k in path}
        # norm gains near 1; NAG's head log-gain near its init log(8 / 0.02), so logits are O(10)
        centre = 1.0 if "scale" in names else 6.0 if "decode_log_gain" in names else 0.0
        return (centre + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype)

    state = jax.tree_util.tree_map_with_path(fill, training_state(cfg).abstract)
    store = CheckpointStore(workdir / "checkpoints")
    store.save(1, state, {}, cfg.to_dict())
    store.close()
    return cfg


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    cfg = saved_run(request.param, root / "run")
    assert main(["export", "--workdir", str(root / "run"), "--out", str(root / "hf")]) == 0
    run = load_run(root / "run")
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 24))
    forward = jax.jit(lambda params, t: nnx.merge(run.graphdef, params)(t)[0])
    logits = forward(run.params, jax.numpy.asarray(tokens))
    return request.param, cfg, root / "hf", tokens, np.asarray(logits)


def test_export_folder(exported):
    residual, cfg, out, _, _ = exported
    from safetensors.numpy import load_file

    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert config["vocab_size"] == cfg.model.vocab_size == 4096
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    run = load_run(out.parent / "run")
    blocks = run.params["blocks"]
    if residual in ("prenorm", "lns"):
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert ("lm_head.weight" in tensors) == (not cfg.model.tie_embeddings)
        for i, block_id in enumerate(cfg.model.block_index_list):
            factor = 1 / math.sqrt(block_id + 1) if residual == "lns" else 1.0
            for k, name in enumerate(("input_layernorm", "post_attention_layernorm")):
                gain = np.asarray(blocks["residual"]["norms"][k]["scale"][i])
                np.testing.assert_allclose(tensors[f"model.layers.{i}.{name}.weight"], gain * factor,
                                           rtol=1e-6)
        assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (
            cfg.model.kv_heads * cfg.model.head_dim, cfg.model.d_model)
    else:
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nagjax.NagjaxForCausalLM"
        assert (out / "modeling_nagjax.py").is_file() and (out / "configuration_nagjax.py").is_file()
        assert config["residual"] == residual and config["block_ids"] == cfg.model.block_index_list
        np.testing.assert_array_equal(tensors["layers.1.attn.wq"], np.asarray(blocks["attn"]["wq"][1]))


def test_transformers_logits_equal_nagjax(exported):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    residual, _, out, tokens, expected = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=residual in ("nag", "attnres"), dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.as_tensor(tokens)).logits.numpy()
    diff = float(np.max(np.abs(got - expected)))
    print(f"{residual}: max |logit difference| = {diff:.3g} (logits up to {np.abs(expected).max():.3g})")
    assert np.abs(expected).max() > 1.0  # logits of a real size, so the tolerance means something
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
