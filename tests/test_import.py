"""`nagjax import`: a Hugging Face folder as a step-0 workdir. Export -> import -> export leaves
every scheme's tensors and logits unchanged (MoD thresholds included); a Pre-LN/Llama folder
imports into NAG with its sublayer weights (pre-norm gains folded in) and fresh NAG parameters;
what nagjax cannot represent is a ConfigError naming it; `nagjax train --workdir` continues an
import. No torch needed (the LlamaForCausalLM-from-transformers check is in test_export_hf.py)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import TINY_RUN, make_hf_tokenizer
from nagjax.analysis.diagnostics import load_run
from nagjax.cli import main
from nagjax.config import ConfigError
from nagjax.data.corpus import embedded_documents
from nagjax.export.hf_import import import_folder
from test_export import saved_run

SMALL = [o for o in TINY_RUN if o.startswith(("data.", "train."))] + ["train.steps=2", "train.eval_every=0"]
CASES = {
    "prenorm": [],
    "lns": ["model.n_kv_heads=1", "model.tie_embeddings=true", "model.block_ids=1,3"],
    "nag": ["model.n_kv_heads=1", "model.depth=3", "mod.rate=0.5"],
    "attnres": ["model.attnres.block_size=3", "model.block_ids=0,2"],
}


def logits_of(workdir, tokens):
    run = load_run(workdir)
    return np.asarray(jax.jit(lambda p, t: nnx.merge(run.graphdef, p)(t)[0])(run.params, tokens))


@pytest.mark.parametrize("residual", sorted(CASES))
def test_export_import_export_round_trip(residual, tmp_path):
    cfg = saved_run(residual, tmp_path / "run", CASES[residual])
    assert main(["export", "-w", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "-w", str(tmp_path / "imported"), "--set", *SMALL]) == 0
    assert main(["export", "-w", str(tmp_path / "imported"), "-o", str(tmp_path / "hf2")]) == 0
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    ca, cb = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("hf", "hf2"))
    for c in (ca, cb):
        c.pop("nagjax")
    assert ca == cb  # MoD thresholds and routing rules included
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 16))
    diff = np.abs(logits_of(tmp_path / "imported", tokens) - logits_of(tmp_path / "run", tokens)).max()
    assert diff < 1e-5, diff
    saved = load_run(tmp_path / "imported")
    assert saved.step == 0 and saved.config.model.residual == residual


def test_llama_into_nag_carries_sublayers_and_starts_nag_fresh(tmp_path, capsys):
    saved_run("prenorm", tmp_path / "run", [])
    main(["export", "-w", str(tmp_path / "run"), "-o", str(tmp_path / "hf")])
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "-w", str(tmp_path / "nag"),
                 "--set", "model.residual=nag", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "fresh" in printed and "blocks.residual.alpha" in printed and "stream.g_enc" in printed
    src, run = load_run(tmp_path / "run"), load_run(tmp_path / "nag")
    assert run.config.model.residual == "nag"
    gain = np.asarray(src.params["blocks"]["residual"]["norms"][0]["scale"])
    np.testing.assert_allclose(np.asarray(run.params["blocks"]["attn"]["wq"]),
                               np.asarray(src.params["blocks"]["attn"]["wq"]) * gain[:, :, None, None], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(run.params["blocks"]["attn"]["wo"]),
                                  np.asarray(src.params["blocks"]["attn"]["wo"]))
    np.testing.assert_array_equal(np.asarray(run.params["embed"]), np.asarray(src.params["embed"]))


def test_what_nagjax_cannot_represent_is_named(tmp_path):
    saved_run("prenorm", tmp_path / "run", [])
    main(["export", "-w", str(tmp_path / "run"), "-o", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "attention_bias": True, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="attention_bias.*hidden_act|hidden_act.*attention_bias"):
        import_folder(tmp_path / "hf", tmp_path / "w1", overrides=SMALL)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2",
                                                             "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*cannot be imported"):
        import_folder(tmp_path / "hf", tmp_path / "w2", overrides=SMALL)


def test_train_continues_an_import(tmp_path):
    saved_run("nag", tmp_path / "run", ["model.n_kv_heads=1"])
    main(["export", "-w", str(tmp_path / "run"), "-o", str(tmp_path / "hf")])
    main(["import", str(tmp_path / "hf"), "-w", str(tmp_path / "w"), "--set", *SMALL])
    assert main(["eval", "--workdir", str(tmp_path / "w"), "--batches", "1"]) == 0
    assert main(["train", "--workdir", str(tmp_path / "w")]) == 0
    assert load_run(tmp_path / "w").step == 2


def test_llama_with_its_own_tokenizer_trains_on_the_embedded_corpus(tmp_path):
    """A folder whose tokenizer is not the embedded corpus's: the corpus is tokenised with it into
    WORKDIR/data, and the import trains, samples and evaluates with it."""
    saved_run("prenorm", tmp_path / "run", [])
    main(["export", "-w", str(tmp_path / "run"), "-o", str(tmp_path / "hf")])
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "hf" / f).unlink()
    make_hf_tokenizer(embedded_documents("validation")[:3], tmp_path / "hf" / "tokenizer.json", vocab_size=600)
    assert main(["import", str(tmp_path / "hf"), "-w", str(tmp_path / "w"), "--set", *SMALL]) == 0
    run = load_run(tmp_path / "w")
    assert run.config.data.source == str((tmp_path / "w" / "data").absolute())
    assert (tmp_path / "w" / "tokenizer" / "tokenizer.json").is_file()
    assert main(["train", "--workdir", str(tmp_path / "w")]) == 0
    assert main(["sample", "--workdir", str(tmp_path / "w"), "-p", "The", "--max-tokens", "4"]) == 0
