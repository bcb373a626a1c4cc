"""Parameter-shared repetition (model.repeat, nagjax/model/loops.py): the executed sequence, the
tied-unrolled equivalence (forward and gradients), counting, configuration errors, MoD per pass,
and KV-cache decoding of a looped stack. Tiny models, seconds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_tiny_model
from nagjax import flops
from nagjax.config import ConfigError, ModConfig, apply_overrides, Config
from nagjax.infer.kv_cache import init_cache
from nagjax.infer.sample import generate_ids
from nagjax.model import build_model
from nagjax.model.loops import executed, executed_blocks, labels
from nagjax.model.transformer import count_params
from test_mod import assert_decoding_matches_the_forward


def _tokens(b=2, t=12, seed=0, vocab=97):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


def test_executed_sequence_orders_and_groups():
    cfg = make_tiny_model(depth=3, repeat=2)
    assert executed_blocks(cfg) == [0, 1, 2, 0, 1, 2]
    assert [e.pass_ for e in executed(cfg)] == [0, 0, 0, 1, 1, 1]
    cfg = make_tiny_model(depth=3, repeat=2, repeat_order="block")
    assert executed_blocks(cfg) == [0, 0, 1, 1, 2, 2] and labels(cfg)[:2] == ["0.0", "0.1"]
    cfg = make_tiny_model(depth=4, repeat=3, repeat_blocks="1:3")
    assert executed_blocks(cfg) == [0, 1, 2, 1, 2, 1, 2, 3] and cfg.executed_depth == 8
    cfg = make_tiny_model(depth=3)
    assert executed_blocks(cfg) == [0, 1, 2] and labels(cfg) == ["0", "1", "2"]


@pytest.mark.parametrize("overrides, key", [
    (["model.repeat=0"], "model.repeat"),
    (["model.repeat=2", "model.repeat_blocks=2:9"], "model.repeat_blocks"),
    (["model.repeat=2", "model.repeat_blocks=3:3"], "model.repeat_blocks"),
    (["model.repeat=2", "model.repeat_blocks=a"], "model.repeat_blocks"),
    (["model.repeat_order=spiral"], "model.repeat_order"),
])
def test_bad_configurations_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(Config(), overrides).validate()


def test_a_taper_with_different_widths_in_the_repeated_group_fails_at_start_up():
    cfg = make_tiny_model(depth=4, repeat=2, taper="linear", taper_multiple=8, vocab_size=97)
    with pytest.raises(ConfigError, match="model.repeat_blocks"):
        build_model(cfg)
    # a group inside one stage of equal widths is fine
    cfg = dataclasses.replace(cfg, taper="custom", taper_widths="64,32,32,16", repeat_blocks="1:3")
    logits, stats = build_model(cfg)(_tokens())
    assert stats["update_ratio"].shape == (6, 2)


def _pure(tree):
    return nnx.to_pure_dict(tree)


def _tied_unrolled(looped_model, cfg):
    """The unrolled model (repeat=1, depth = executed depth) whose block p holds block b(p)'s
    weights and executed position p's residual parameters."""
    unrolled_cfg = dataclasses.replace(cfg, depth=cfg.executed_depth, repeat=1, repeat_order="cycle",
                                       repeat_blocks="", repeat_share_residual=False)
    unrolled = build_model(unrolled_cfg, seed=99)
    src = _pure(nnx.state(looped_model, nnx.Param))
    dst = _pure(nnx.state(unrolled, nnx.Param))
    rows = np.asarray(executed_blocks(cfg))
    blocks = jax.tree.map(lambda x: x[rows], src.pop("blocks"))
    if "pass_residuals" in src:
        blocks["residual"] = src.pop("pass_residuals")
    src["blocks"] = blocks
    assert jax.tree.structure(src) == jax.tree.structure(dst)
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, src)
    nnx.update(unrolled, state)
    return unrolled


def _loss_and_grads(model, tokens, weights):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest)(tokens)
        return jnp.sum(logits * weights)

    value, grads = jax.value_and_grad(loss)(params)
    return value, _pure(grads)


@pytest.mark.parametrize("residual, order, share", [
    ("nag", "cycle", True), ("lns", "block", True), ("nag", "block", False), ("attnres", "block", False)])
def test_looped_equals_tied_unrolled_forward_and_gradients(residual, order, share):
    """R = 2 equals the unrolled 2L-block model with tied block weights: the same logits, and
    each shared weight's gradient is the sum of the tied copies' gradients over the passes."""
    cfg = make_tiny_model(residual=residual, depth=2, repeat=2, repeat_order=order, repeat_share_residual=share)
    looped = build_model(cfg, seed=3)
    unrolled = _tied_unrolled(looped, cfg)
    tokens = _tokens()
    weights = jax.random.normal(jax.random.PRNGKey(1), (2, 12, cfg.vocab_size))
    l_loop, g_loop = _loss_and_grads(looped, tokens, weights)
    l_unr, g_unr = _loss_and_grads(unrolled, tokens, weights)
    np.testing.assert_allclose(l_loop, l_unr, rtol=1e-5)
    rows = np.asarray(executed_blocks(cfg))
    summed = jax.tree.map(lambda g: jax.ops.segment_sum(g, rows, num_segments=cfg.depth), g_unr["blocks"])
    if not share:
        for a, b in zip(jax.tree.leaves(g_loop["pass_residuals"]), jax.tree.leaves(g_unr["blocks"]["residual"]),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        del summed["residual"]
    for a, b in zip(jax.tree.leaves(g_loop["blocks"]), jax.tree.leaves(summed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for key in g_loop:
        if key not in ("blocks", "pass_residuals"):
            for a, b in zip(jax.tree.leaves(g_loop[key]), jax.tree.leaves(g_unr[key]), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_parameters_count_once_and_flops_per_executed_pass():
    for residual in ("prenorm", "nag"):
        unique = make_tiny_model(residual=residual, depth=4)
        half = make_tiny_model(residual=residual, depth=2)
        looped = make_tiny_model(residual=residual, depth=2, repeat=2)
        for order in ("cycle", "block"):
            looped = dataclasses.replace(looped, repeat_order=order)
            assert flops.train_flops_per_token(looped, 16) == pytest.approx(flops.train_flops_per_token(unique, 16))
        model = build_model(looped)
        extra = count_params(model) - count_params(build_model(half))
        if residual == "prenorm":  # the pre-norm gains belong to the block: nothing per pass
            assert extra == 0 and not model.per_pass
        else:  # NAG's gates and modulator: one set per executed pass (4), the blocks' weights once
            assert extra == count_params(model.pass_residuals) // 2 > 0
        shared = dataclasses.replace(looped, repeat_share_residual=True)
        assert count_params(build_model(shared)) == count_params(build_model(half))


def test_mod_on_a_looped_stack_routes_per_executed_pass():
    cfg = make_tiny_model(residual="nag", depth=2, repeat=3)
    model = build_model(cfg, seed=2, mod=ModConfig(rate=0.5, exempt_first_blocks=1))
    _, stats = model(_tokens(t=16))
    rate = np.asarray(stats["skip_rate"])  # [executed positions, 2]
    assert rate.shape == (6, 2)
    assert (rate[0] == 0).all() and np.allclose(rate[1:], 0.5)  # the first executed block is exempt


@pytest.mark.parametrize("threshold", [False, True])
def test_kv_cache_decoding_of_a_looped_stack_matches_the_full_forward(threshold):
    """One cache per executed (block, pass); token by token the same logits as the full forward,
    the same tokens skip; greedy generation (really skipping) gives the full forward's tokens."""
    cfg = make_tiny_model(residual="nag", depth=2, repeat=2, repeat_order="block")
    model = build_model(cfg, seed=6, mod=ModConfig(rate=0.0, exempt_first_blocks=1))
    assert len(init_cache(cfg, 1, 8, jnp.float32)) == cfg.executed_depth  # a cache per executed block
    tokens = _tokens(b=1, t=8, seed=7)
    tau, ctx = assert_decoding_matches_the_forward(model, tokens, threshold, skip_compute=True)
    if not threshold:  # dense: the per-token logits above already match
        return
    # greedy generation, really skipping = argmax of the full forward over the growing sequence
    prompt = [int(t) for t in tokens[0, :3]]
    out = generate_ids(*nnx.split(model), [prompt], eos_id=-1, max_new_tokens=4,
                       thresholds=np.asarray(tau), pad_to=7)
    seq = list(prompt)
    for _ in range(4):
        logits, _ = model(jnp.asarray([seq]), ctx=ctx)
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out.tokens[0] == seq[3:]


def test_the_microscope_observes_every_executed_pass():
    from nagjax.analysis.diagnostics import per_pass, trace

    cfg = make_tiny_model(residual="nag", depth=2, repeat=2)
    model = build_model(cfg, seed=1)
    keep = np.ones(4)
    keep[3] = 0  # skip block 1's second pass
    logits, sub, blk = trace(model, _tokens(), keep)
    assert sub["update_ratio"].shape == (4, 2) and blk["block_cosine"].shape == (4,)
    assert float(blk["block_cosine"][3]) == pytest.approx(1.0)
    skip = np.array([[0.0, 0.0], [0.2, 0.4], [0.5, 0.5], [0.6, 0.8]])
    passes = per_pass(cfg, {"update_ratio": np.asarray(sub["update_ratio"])}, skip)
    assert [p["positions"] for p in passes] == [[0, 1], [2, 3]]
    assert passes[1]["skip_rate"] == pytest.approx(0.6) and passes[0]["skip_rate_mlp"] == pytest.approx(0.2)


@pytest.mark.parametrize("residual", ["lns", "nag"])
def test_export_writes_the_executed_sequence(residual, tmp_path):
    """A looped LNS exports as a plain Llama of its executed layers (shared weights once per
    executed layer, the LNS factor from the executed position); NAG through the remote code, each
    executed layer with its pass's own gates."""
    import math

    from safetensors.numpy import load_file

    from conftest import TINY_RUN
    from nagjax.analysis.diagnostics import load_run
    from nagjax.cli import main
    from nagjax.train.checkpoint import CheckpointStore
    from nagjax.train.state import training_state
    from nagjax.train.trainer import resolve

    cfg = resolve(apply_overrides(Config(), [*TINY_RUN, f"model.residual={residual}", "model.repeat=2",
                                             "model.repeat_order=block"]))
    rng = np.random.default_rng(7)
    state = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1 + 1).astype(a.dtype)
                         if a.dtype.kind == "f" else np.zeros(a.shape, a.dtype), training_state(cfg).abstract)
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    store.save(1, state, {}, cfg.to_dict())
    store.close()
    assert main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    import json
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    params = load_run(tmp_path / "run").params
    rows = executed_blocks(cfg.model)  # [0, 0, 1, 1]
    assert config["num_hidden_layers"] == 4
    for p, b in enumerate(rows):
        if residual == "lns":
            np.testing.assert_array_equal(tensors[f"model.layers.{p}.self_attn.q_proj.weight"],
                                          np.asarray(params["blocks"]["attn"]["wq"][b]).reshape(32, -1).T)
            gain = np.asarray(params["blocks"]["residual"]["norms"][0]["scale"][b])
            np.testing.assert_allclose(tensors[f"model.layers.{p}.input_layernorm.weight"],
                                       gain / math.sqrt(p + 1), rtol=1e-6)
        else:
            np.testing.assert_array_equal(tensors[f"layers.{p}.attn.wq"], np.asarray(params["blocks"]["attn"]["wq"][b]))
            np.testing.assert_array_equal(tensors[f"layers.{p}.residual.alpha"],
                                          np.asarray(params["pass_residuals"]["alpha"][p]))
            assert config["block_ids"] == [0, 1, 2, 3]


def test_loop_sweeps_are_registered_and_compare_at_equal_flops():
    from nagjax.registry import get_sweep, load_experiments

    load_experiments()
    for name in ("loop_tiny", "loop_h100"):
        sweep = get_sweep(name)
        per_token = {}
        for v in sweep.variants:
            cfg = apply_overrides(sweep.base, [*v.overrides, "model.vocab_size=4096"]).validate()
            per_token[v.name] = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        depth = sweep.base.model.depth
        for scheme in ("prenorm", "nag"):
            for order in ("cycle", "block"):
                assert per_token[f"{scheme}_L{depth // 2}x2_{order}"] == pytest.approx(per_token[f"{scheme}_L{depth}"])
