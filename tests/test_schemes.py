"""The residual-scheme registry: a scheme defined and registered in this file alone (Post-LN)
trains through the real trainer, is counted by the FLOP counter, gets its own optimiser group and
sharding rule, and runs under the depth microscope; unknown schemes are errors; and no module
outside `nagjax/model/residual/` branches on a scheme's name."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_RUN
from nagjax import flops, sharding
from nagjax.config import Config, ConfigError, ModelConfig, apply_overrides
from nagjax.model import build_model
from nagjax.model.layers import RMSNorm, mean_rms
from nagjax.model.residual import SCHEMES, ParamGroup, Scheme, register, unregister
from nagjax.train import optim

POSTLN_ROW_FLOPS = 5  # per feature: add, and the RMSNorm after it


class PostLNGain(nnx.Param):
    """Post-LN's per-sublayer residual gain: an optimiser group of its own."""


class PostLNStream(nnx.Module):
    def __init__(self, cfg, *, rngs):
        del cfg, rngs

    def embedding_table(self, raw_vd):
        return raw_vd

    def encode(self, embeddings_btd):
        return {"x": embeddings_btd}

    def logits(self, state, head_vd):
        return jnp.einsum("btd,vd->btv", state["x"], head_vd.astype(state["x"].dtype))

    def head_inputs(self, state):
        return state

    def residual_vector(self, state):
        return state["x"].astype(jnp.float32)


class PostLNResidual(nnx.Module):
    """x <- Norm(x + gain * F(x)) (the original Transformer's post-norm residual)."""

    def __init__(self, cfg, block_index, *, rngs):
        self.norms = nnx.List([RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs) for _ in range(2)])
        self.gain = PostLNGain(jnp.ones((2,), jnp.float32), logical_axes=("postln_slot",))

    def __call__(self, state, sublayer, positions_bt, slot, block_index, ctx):
        x = state["x"]
        f = sublayer(x, positions_bt, kv=None)
        new = self.norms[slot](x + self.gain[...][slot].astype(x.dtype) * f)
        return {"x": new}, {"stream_rms": mean_rms(new), "update_ratio": mean_rms(f) / (mean_rms(x) + 1e-12)}


POSTLN = Scheme(
    name="postln",
    description="Post-LN: x <- Norm(x + F(x))",
    stream=PostLNStream,
    block_residual=PostLNResidual,
    sublayer_row_flops=lambda cfg, executed: POSTLN_ROW_FLOPS * cfg.d_model,
    param_groups=(ParamGroup("postln_gain", PostLNGain, lr_scale=lambda optim_cfg: 0.5),),
    logical_axes={"postln_slot": None},
)


@pytest.fixture
def postln():
    register(POSTLN)  # the one registry line
    yield POSTLN
    unregister("postln")


def test_a_scheme_from_one_file_trains_counts_flops_and_groups_params(postln, tmp_path):
    from nagjax.train.logging import read_metrics
    from nagjax.train.trainer import evaluate_workdir, train

    config = apply_overrides(Config(name="postln"), [
        *TINY_RUN, "model.residual=postln", "train.steps=2", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=0", "train.log_every=1"])
    result = train(config, tmp_path)
    records = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [s for s in sorted(records) if "train/loss" in records[s]] == [1, 2]
    assert math.isfinite(result.val_loss) and result.step == 2
    assert "layers/stream_rms/01_mlp" in records[2]
    assert evaluate_workdir(tmp_path)["loss"] == pytest.approx(result.val_loss, rel=1e-6)

    model_cfg = dataclasses.replace(config.model, vocab_size=97)
    breakdown = flops.forward_breakdown(model_cfg, 32)
    assert breakdown.residual == 2 * model_cfg.depth * POSTLN_ROW_FLOPS * model_cfg.d_model

    params = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)), nnx.Param)[1]
    labels = optim.param_groups(params)
    assert labels["blocks"]["residual"]["gain"] == "postln_gain"
    assert labels["blocks"]["residual"]["norms"][0]["scale"] == "vector"
    assert labels["blocks"]["attn"]["wq"] == "matrix"
    opt_state = optim.make_optimizer(config.optim, 10, params).init(params)
    assert {"matrix", "vector", "postln_gain"} <= set(opt_state[1].inner_states)
    assert sharding.logical_rules()["postln_slot"] is None


def test_the_microscope_reads_a_registered_scheme(postln):
    from nagjax.analysis.diagnostics import trace

    model = build_model(apply_overrides(Config(), [*TINY_RUN, "model.residual=postln",
                                                   "model.vocab_size=97"]).model)
    tokens = jnp.arange(12).reshape(2, 6)
    logits, sub, blk = trace(model, tokens)
    assert logits.shape == (2, 6, 97) and sub["stream_rms"].shape == (2, 2)
    # post-norm: a unit-RMS stream at every depth (up to norm_eps against the embedding's tiny scale)
    np.testing.assert_allclose(sub["stream_rms"], 1.0, rtol=1e-2)
    assert blk["block_cosine"].shape == (2,)


def test_unknown_scheme_is_an_error_everywhere():
    with pytest.raises(ConfigError, match=r"model.residual: got 'nga'; expected one of .*did you mean 'nag'"):
        apply_overrides(Config(), ["model.residual=nga"])
    cfg = ModelConfig(residual="postln", vocab_size=97)
    with pytest.raises(ConfigError, match="model.residual: got 'postln'"):
        flops.forward_breakdown(cfg, 16)  # never silently counted as Pre-LN
    with pytest.raises(ConfigError, match="skip signal"):
        apply_overrides(Config(), ["model.residual=prenorm", "mod.rate=0.25"])


def test_no_scheme_name_branches_outside_the_schemes():
    root = Path(__file__).resolve().parents[1] / "nagjax"
    # `cfg.residual == "nag"`, `r["residual"] != 'lns'`, `residual in ("nag", ...)`
    pattern = re.compile(r"""residual\s*[!=]=|residual["']\]\s*[!=]=\s*["']|residual\s+(not\s+)?in\s+[(\[{]""")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "model/residual" not in str(p)
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
