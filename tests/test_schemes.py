"""The residual-scheme registry: a scheme defined and registered in this file alone (Post-LN, with
hyperparameters of its own, a plotted statistic and a Hugging Face exporter) trains through the
real trainer, takes `model.postln.*` overrides, is counted by the FLOP counter, gets its own
optimiser group and sharding rule, is plotted by the depth microscope and exported; unknown
schemes are errors; and no module outside `nagjax/model/residual/` branches on a scheme's name.
In a package, the scheme is one file under model/residual/ and its exporter one under export/."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_RUN
from nagjax import flops, sharding
from nagjax.analysis.plots import analyze
from nagjax.config import Config, ConfigError, ModelConfig, SchemeOptions, apply_overrides, config_from_dict
from nagjax.export.hf import export_workdir
from nagjax.export.layers import flat, per_block
from nagjax.export.registry import EXPORTERS, register_exporter
from nagjax.model import build_model
from nagjax.model.layers import RMSNorm, mean_rms
from nagjax.model.residual import MicroscopeStat, ParamGroup, Scheme, register, unregister
from nagjax.train import optim
from nagjax.train.logging import read_metrics
from nagjax.train.trainer import evaluate_workdir, train

POSTLN_ROW_FLOPS = 5  # per feature: add, and the RMSNorm after it


@dataclass(frozen=True)
class PostLNConfig(SchemeOptions):
    """`model.postln.*`: the scheme's own hyperparameters, defined beside it."""

    gain_init: float = 1.0

    def validate(self, prefix: str = "model.postln") -> None:
        if not self.gain_init > 0:
            raise ConfigError(f"{prefix}.gain_init: must be > 0")


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
        self.gain = PostLNGain(jnp.full((2,), cfg.postln.gain_init, jnp.float32), logical_axes=("postln_slot",))

    def __call__(self, state, sublayer, positions_bt, slot, block_index, ctx):
        x = state["x"]
        f = sublayer(x, positions_bt, kv=None)
        new = self.norms[slot](x + self.gain[...][slot].astype(x.dtype) * f)
        return {"x": new}, {"stream_rms": mean_rms(new), "update_ratio": mean_rms(f) / (mean_rms(x) + 1e-12),
                            "gain": self.gain[...][slot]}


POSTLN = Scheme(
    name="postln",
    description="Post-LN: x <- Norm(x + F(x))",
    stream=PostLNStream,
    block_residual=PostLNResidual,
    sublayer_row_flops=lambda cfg, executed: POSTLN_ROW_FLOPS * cfg.d_model,
    param_groups=(ParamGroup("postln_gain", PostLNGain, lr_scale=lambda optim_cfg: 0.5),),
    logical_axes={"postln_slot": None},
    microscope={"postln_gain": MicroscopeStat("gain", "Post-LN residual gain")},
    options=PostLNConfig,
)


def postln_export(cfg: ModelConfig, params: dict) -> tuple[dict, dict]:
    """What an exporter module under export/ would hold: config.json and flat tensors."""
    tensors = flat({k: v for k, v in params.items() if k != "blocks"})
    for i, block in enumerate(per_block(cfg, params)):
        tensors.update(flat(block, f"layers.{i}."))
    return {"model_type": "postln", "gain_init": cfg.postln.gain_init, "num_hidden_layers": cfg.depth}, tensors


@pytest.fixture
def postln():
    register(POSTLN)  # the one registry line
    register_exporter("postln", postln_export)  # ... and its exporter's
    yield POSTLN
    unregister("postln")
    del EXPORTERS["postln"]


def test_a_scheme_from_one_file_trains_counts_flops_groups_params_plots_and_exports(postln, tmp_path):
    with pytest.raises(ConfigError, match="model.postln.gain_init: must be > 0"):
        apply_overrides(Config(), ["model.residual=postln", "model.postln.gain_init=0"])
    config = apply_overrides(Config(name="postln"), [
        *TINY_RUN, "model.residual=postln", "model.postln.gain_init=0.5", "train.steps=2", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=0", "train.log_every=1"])
    assert config.model.postln == PostLNConfig(gain_init=0.5)
    assert config.to_dict()["model"]["postln"] == {"gain_init": 0.5}
    assert config_from_dict(config.to_dict()) == config
    result = train(config, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl")
    assert [s for s in sorted(records) if "train/loss" in records[s]] == [1, 2]
    assert math.isfinite(result.val_loss) and result.step == 2
    assert "layers/stream_rms/01_mlp" in records[2]
    assert evaluate_workdir(tmp_path / "run")["loss"] == pytest.approx(result.val_loss, rel=1e-6)

    # the microscope records and plots the scheme's own statistic, read from its registry entry
    out = analyze([tmp_path / "run"], tmp_path / "micro", eval_batches=1, skip_losses=False)
    gain = np.asarray(out["runs"][0]["sublayers"]["postln_gain"])
    assert gain.shape == (config.model.depth, 2) and np.all(gain > 0) and np.all(gain < 1)  # from 0.5
    np.testing.assert_allclose(out["runs"][0]["sublayers"]["stream_rms"], 1.0, rtol=1e-2)  # post-norm
    assert (tmp_path / "micro" / "postln_gain.png").is_file()

    exported = export_workdir(tmp_path / "run", tmp_path / "hf")
    assert exported["gain_init"] == 0.5 and exported["nagjax"]["residual"] == "postln"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "postln"
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 0

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
