"""Mixture-of-Depths on NAG (docs/methods.md §2): gather/scatter training path, causal thresholds, FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_tiny_model
from nagjax import flops
from nagjax.config import Config, ConfigError, ModConfig, apply_overrides
from nagjax.infer.calibration import calibrate_thresholds
from nagjax.infer.decode import block_params_fn, decode_step_fn
from nagjax.infer.kv_cache import init_cache
from nagjax.model import StepContext, build_model
from nagjax.model.layers import Attention
from nagjax.model.mod import DENSE, MoDPolicy, kept_tokens, realised_rate, select_topk
from nagjax.model.residual.base import ATTENTION, MLP
from nagjax.model.residual.nag import NagResidual, NagStream, modulator_flops
from nagjax.train.state import training_state
from pallas_kernels.nag_update.reference import modulator

CFG = make_tiny_model(residual="nag")


def _forward(model, ctx=None):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, ctx=ctx))


def threshold_routing(mod, tau, quantile_rates=()):
    return MoDPolicy.of(CFG, mod).threshold_routing(tau, quantile_rates)


def training_routing(mod, seq_len=None):
    return MoDPolicy.of(CFG, mod).train_routing(seq_len)


def _tokens(b=2, t=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def test_rate_zero_is_the_dense_model():
    tokens = _tokens()
    dense, _ = build_model(CFG, seed=1)(tokens)
    mod0, stats = build_model(CFG, seed=1, mod=ModConfig(rate=0.0))(tokens)
    np.testing.assert_array_equal(dense, mod0)
    assert float(stats["skip_rate"].max()) == 0.0


def test_kept_tokens():
    assert kept_tokens(128, 0.25) == 96 and kept_tokens(10, 0.25) == 8 and kept_tokens(4, 0.99) == 1
    # rounded up to whole tiles, never past the sequence
    assert kept_tokens(2000, 0.25, 128) == 1536 and kept_tokens(100, 0.1, 64) == 100
    assert kept_tokens(2048, 0.125, 128) == 1792


def test_k_rounded_up_to_the_sequence_runs_densely():
    """mod.kept_multiple can round k up to every token (r = 0.1 of 16 tokens in tiles of 16): the
    sublayers then run as in the dense model, without the selection's sort and gathers."""
    tokens = _tokens()
    dense, _ = build_model(CFG, seed=1)(tokens)
    model = build_model(CFG, seed=1, mod=ModConfig(rate=0.1, kept_multiple=16, exempt_first_blocks=0))
    logits, stats = model(tokens)
    np.testing.assert_array_equal(logits, dense)
    assert float(stats["skip_rate"].max()) == 0.0
    graphdef, params = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens))(params))
    assert " sort[" not in jaxpr and "sort" in str(jax.make_jaxpr(
        lambda p: nnx.merge(graphdef, p)(tokens, ctx=StepContext(
            routing=training_routing(ModConfig(rate=0.5)))))(params))


def test_thresholds_follow_stack_positions_in_a_pruned_model():
    """A pruned model (block_ids 0,2,3) reads row i of its [depth, 2] thresholds for its i-th block
    (the rows follow stack positions, as training and pruning write them), not row block_id."""
    cfg = dataclasses.replace(CFG, block_ids="0,2,3")
    mod = ModConfig(rate=0.25, exempt_first_blocks=0)
    model = build_model(cfg, seed=1, mod=mod)
    tau = jnp.asarray([[-jnp.inf, -jnp.inf], [jnp.inf, jnp.inf], [-jnp.inf, -jnp.inf]])  # skip block 2 only
    _, stats = model(_tokens(), ctx=StepContext(routing=model.mod_policy.threshold_routing(tau)))
    np.testing.assert_array_equal(np.asarray(stats["skip_rate"]), [[0, 0], [1, 1], [0, 0]])


def test_thresholds_calibrate_at_the_rate_top_k_realises():
    """With k rounded up to whole tiles, top-k skips less than mod.rate: the training EMA tracks
    the realised rate, so the causal thresholds skip what training skipped."""
    assert realised_rate(256, ModConfig(rate=0.1, kept_multiple=64)) == 0.0  # k = 256: nothing skips
    assert realised_rate(1024, ModConfig(rate=0.3, kept_multiple=128)) == 0.25
    routing = training_routing(ModConfig(rate=0.3, kept_multiple=128), seq_len=1024)
    assert routing.quantile_rates == (0.25,)
    assert training_routing(ModConfig(rate=0.3, kept_multiple=128)).quantile_rates == ()  # the model's default


def test_selection_is_lax_top_k_with_gather_only_gradients():
    """The sort-free selection keeps exactly lax.top_k's tokens (ties to the earlier token), and
    moving rows in and out has the gradients of plain indexing."""
    signal = jnp.round(jax.random.uniform(jax.random.key(0), (3, 40)), 1)  # many ties
    for k in (1, 7, 20, 40):
        sel = select_topk(signal, k)
        np.testing.assert_array_equal(sel.idx, jnp.sort(jax.lax.top_k(signal, k)[1], axis=-1))
        np.testing.assert_array_equal(sel.keep.sum(-1), k)
        np.testing.assert_array_equal(jnp.take_along_axis(sel.row, sel.idx, axis=1), jnp.arange(k)[None].repeat(3, 0))
    sel = select_topk(signal, 13)
    x = jax.random.normal(jax.random.key(1), (3, 40, 5))
    w = jax.random.normal(jax.random.key(2), (3, 40, 5))
    rows_of = lambda a: jnp.take_along_axis(a, sel.idx[..., None], axis=1)

    def ours(x):
        return jnp.sum(w * sel.put(x * 0.5, jnp.sin(sel.take(x))))

    def reference(x):  # gather, then scatter the rows back
        batch = jnp.arange(3)[:, None]
        return jnp.sum(w * (x * 0.5).at[batch, sel.idx].set(jnp.sin(rows_of(x))))

    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-6, atol=1e-7)


def test_mod_train_step_compiles_without_scatters():
    """Top-k routing moves rows with gathers both ways: the MoD train step has no more XLA
    scatters than the dense one (those left are the embedding's and the loss's gradients)."""
    def scatters(*overrides):
        cfg = apply_overrides(Config(), ["model.residual=nag", "model.d_model=32", "model.depth=2",
                                         "model.n_heads=2", "model.vocab_size=97", "data.seq_len=16",
                                         "data.batch_size=2", *overrides])
        spec = training_state(cfg)
        tokens = jnp.zeros((2, 16), jnp.int32)
        text = spec.steps.train.lower(spec.abstract, {"inputs": tokens, "targets": tokens}, 0).compile().as_text()
        return text.count(" scatter(")

    assert scatters("mod.rate=0.5", "mod.exempt_first_blocks=0") == scatters()


@pytest.fixture
def block_and_state():
    block = NagResidual(CFG, 1, rngs=nnx.Rngs(3))
    emb = jax.random.normal(jax.random.key(4), (2, 12, CFG.d_model))
    state = NagStream(CFG, rngs=nnx.Rngs(0)).encode(emb)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    return block, state, positions


def _kept_mask(stats):
    return np.asarray(stats["skip_by_position"]) == 0  # batch-mean; used with identical rows only


def _topk_rows(block, state, slot, rate):
    m = block.gate_params(slot)
    alpha, beta, w, b, lg = m
    gate = modulator(state["direction"], w, b, lg, beta)
    k = kept_tokens(gate.shape[1], rate)
    return np.sort(np.asarray(jax.lax.top_k(gate, k)[1]), axis=-1)


def test_gathered_mlp_equals_dense_on_kept_tokens(block_and_state):
    block, state, positions = block_and_state
    mlp = lambda x, p, **kw: jnp.tanh(x * 3.0) + 0.1  # token-wise, like the MLP
    mod = ModConfig(rate=0.5)
    dense, _ = block(state, mlp, positions, MLP, 1, StepContext())
    gathered, stats = block(state, mlp, positions, MLP, 1, StepContext(routing=training_routing(mod)))
    idx = _topk_rows(block, state, MLP, 0.5)
    assert float(stats["skip_rate"]) == 0.5
    for b in range(2):
        kept = np.zeros(12, bool)
        kept[idx[b]] = True
        np.testing.assert_allclose(gathered["direction"][b, kept], dense["direction"][b, kept], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gathered["log_norm"][b, kept], dense["log_norm"][b, kept], rtol=1e-6)
        # skipped tokens pass unchanged in both lanes
        np.testing.assert_array_equal(gathered["direction"][b, ~kept], state["direction"][b, ~kept])
        np.testing.assert_array_equal(gathered["log_norm"][b, ~kept], state["log_norm"][b, ~kept])


@pytest.mark.parametrize("kv", ["all", "kept"])
def test_gathered_attention_matches_reference_semantics(block_and_state, kv):
    block, state, positions = block_and_state
    attn = Attention(CFG, rngs=nnx.Rngs(5))
    mod = ModConfig(rate=0.5, kv=kv)
    gathered, _ = block(state, attn, positions, ATTENTION, 1, StepContext(routing=training_routing(mod)))
    idx = _topk_rows(block, state, ATTENTION, 0.5)
    for b in range(2):
        sub = {k: v[b:b + 1, idx[b]] for k, v in state.items()}
        if kv == "all":  # kept queries attend to every earlier token: the dense result on those rows
            ref, _ = block(state, attn, positions, ATTENTION, 1, StepContext())
            ref_rows = ref["direction"][b, idx[b]]
        else:  # skipped tokens give no K/V: exactly the model run on the kept subsequence alone
            ref, _ = block(sub, attn, positions[b:b + 1, idx[b]], ATTENTION, 1, StepContext())
            ref_rows = ref["direction"][0]
        np.testing.assert_allclose(gathered["direction"][b, idx[b]], ref_rows, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_modulator_under_topk():
    model = build_model(CFG, seed=2, mod=ModConfig(rate=0.5, exempt_first_blocks=1))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = _tokens()

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 1])

    g = jax.grad(loss)(params)["blocks"]["residual"]
    for name in ("mod_w", "mod_b", "mod_logits", "beta_raw", "alpha"):
        per_block = np.abs(np.asarray(g[name][...])).reshape(CFG.depth, -1).max(axis=1)
        assert np.all(np.isfinite(per_block)) and np.all(per_block[1:] > 0), name


@pytest.mark.parametrize("kv", ["kept", "all"])
def test_threshold_path_runs_the_same_tokens_as_topk(kv):
    """Set tau per sublayer between the k-th and (k+1)-th largest m of one sequence: the causal
    threshold rule then executes exactly the top-k tokens at every sublayer."""
    mod = ModConfig(rate=0.25, kv=kv, exempt_first_blocks=1)
    model = build_model(CFG, seed=4, mod=mod)
    tokens = _tokens(b=1, t=24, seed=5)
    _, topk = model(tokens)
    gate = np.asarray(topk["gate_by_position"])  # [depth, 2, t]
    k = kept_tokens(24, mod.rate)
    ordered = -np.sort(-gate, axis=-1)
    tau = (ordered[..., k - 1] + ordered[..., k]) / 2
    ctx = StepContext(routing=threshold_routing(mod, jnp.asarray(tau)))
    _, thr = model(tokens, ctx=ctx)
    np.testing.assert_array_equal(np.asarray(thr["skip_by_position"]), np.asarray(topk["skip_by_position"]))
    np.testing.assert_allclose(np.asarray(thr["gate_by_position"]), gate, rtol=1e-4, atol=1e-5)
    assert float(np.asarray(thr["skip_rate"])[1:].mean()) == pytest.approx((24 - k) / 24)


def test_calibration_under_skipping_realises_the_rate():
    """Thresholds calibrated in a pass where every eligible sublayer already skips the rate: the
    causal threshold pass over the same batch then skips that rate in every eligible sublayer
    (later sublayers see exactly the skipping they were calibrated under)."""
    mod = ModConfig(rate=0.0, exempt_first_blocks=1)
    model = build_model(CFG, seed=4, mod=mod)
    graphdef, params = nnx.split(model)
    batch = {"inputs": _tokens(b=2, t=16, seed=9)}
    tau = calibrate_thresholds(graphdef, params, [batch], (0.3,), under_skipping=True)[..., 0]
    _, stats = _forward(model, StepContext(routing=threshold_routing(mod, jnp.asarray(tau))))(params, batch["inputs"])
    np.testing.assert_allclose(np.asarray(stats["skip_rate"])[1:], 0.3, atol=1 / 32)
    assert float(np.asarray(stats["skip_rate"])[0].max()) == 0.0  # the exempt block


def test_flops_count_only_executed_work():
    cfg = dataclasses.replace(CFG, depth=4, vocab_size=1000)
    t = 128
    dense = flops.forward_breakdown(cfg, t)
    half = flops.forward_breakdown(cfg, t, mod=ModConfig(rate=0.5, exempt_first_blocks=0, kv="kept"))
    assert half.mlp == pytest.approx(dense.mlp / 2)
    assert half.attention_matmuls == pytest.approx(dense.attention_matmuls / 2)
    assert half.attention_scores == pytest.approx(dense.attention_scores / 4)
    allkv = flops.forward_breakdown(cfg, t, mod=ModConfig(rate=0.5, exempt_first_blocks=0, kv="all"))
    assert allkv.attention_scores == pytest.approx(dense.attention_scores / 2)
    assert allkv.attention_matmuls > half.attention_matmuls
    # the modulator runs on every token; gather/scatter/top-k are counted on top
    mod_only = 2 * cfg.depth * modulator_flops(cfg)
    assert half.residual > mod_only and half.residual < dense.residual
    assert half.head == dense.head
    exempt = flops.forward_breakdown(cfg, t, mod=ModConfig(rate=0.5, exempt_first_blocks=1))
    assert exempt.mlp == pytest.approx(dense.mlp * (1 + 3 * 0.5) / 4)
    measured = flops.forward_breakdown(cfg, t, executed=np.full((4, 2), 0.5))
    assert measured.mlp == pytest.approx(dense.mlp / 2)


@pytest.mark.parametrize("residual, threshold, taper, kv", [
    ("prenorm", False, "none", "kept"), ("nag", False, "none", "kept"), ("nag", True, "none", "kept"),
    ("nag", True, "none", "all"), ("nag", True, "linear", "kept")])
def test_kv_cache_decoding_matches_the_full_forward(residual, threshold, taper, kv):
    """Token by token from an empty cache, for every K/V rule: the same logits as the full
    forward, and the same tokens skip every sublayer."""
    cfg = dataclasses.replace(CFG, residual=residual, taper=taper, taper_multiple=8)
    model = build_model(cfg, seed=6, mod=ModConfig(rate=0.0, kv=kv, exempt_first_blocks=1))
    assert_decoding_matches_the_forward(model, _tokens(b=1, t=10, seed=7), threshold, skip_compute=False)


def assert_decoding_matches_the_forward(model, tokens, threshold: bool, *, skip_compute: bool):
    """Decode `tokens` [1, t] one by one from an empty cache and compare with the full forward: the
    same logits, and under `threshold` (a tau that skips some tokens in every eligible sublayer)
    the same tokens skip every sublayer. Returns the thresholds and the forward's context."""
    cfg, depth, t = model.cfg, model.cfg.executed_depth, tokens.shape[1]
    graphdef, params = nnx.split(model)
    if threshold:
        routing = model.mod_policy.threshold_routing(jnp.full((depth, 2), -jnp.inf), quantile_rates=(0.4,))
        _, stats = model(tokens, ctx=StepContext(routing=routing))
        tau = stats["gate_quantiles"][..., 0]
        ctx = StepContext(routing=model.mod_policy.threshold_routing(tau))
    else:
        tau, ctx = jnp.zeros((depth, 2)), None
    full, full_stats = model(tokens, ctx=ctx)
    step = decode_step_fn(graphdef, thresholds=threshold, skip_compute=skip_compute)
    blocks = block_params_fn(graphdef)(params)
    cache = init_cache(cfg, 1, t, jnp.float32)
    executed = []
    for pos in range(t):
        logits, cache, counts = step(params, blocks, cache, tokens[:, pos], jnp.array([pos]), jnp.array([True]), tau)
        np.testing.assert_allclose(logits[0], full[0, pos], rtol=2e-4, atol=2e-5)
        executed.append(np.asarray(counts["executed"]))
    if threshold:
        skipped_full = np.asarray(full_stats["skip_by_position"])  # [executed depth, 2, t]
        np.testing.assert_array_equal(1 - np.stack(executed, axis=-1), skipped_full)
        assert 0 < skipped_full[1:].mean() < 1
    return tau, ctx


def test_the_policy_decides_every_use():
    """One MoDPolicy answers, per use, how tokens are routed: training top-k (with the EMA's
    quantile when it skips), causal evaluation on the trained thresholds only for a run that trains
    with MoD, sampling's thresholds and real skipping, and the sweep's points."""
    aux = {"mod_tau": jnp.full((CFG.depth, 2), 0.5)}
    trains = MoDPolicy.of(CFG, ModConfig(rate=0.25))
    assert trains.skipping and trains.train_routing(16).mode == "topk" and trains.train_routing(16).quantile_rates
    assert trains.eval_routing(aux).mode == "threshold" and trains.eval_routing(aux).tau is aux["mod_tau"]
    tau, source = trains.sample_thresholds(aux)
    assert source.startswith("trained") and np.all(tau == 0.5)
    assert trains.sample_routing(tau).skip_compute and not trains.sample_routing(tau, skip_compute=False).skip_compute
    assert trains.sample_thresholds(aux, dense=True) == (None, "none (dense)")
    assert np.all(trains.sample_thresholds(aux, rate=0.0)[0] == -np.inf)
    assert trains.sample_thresholds(aux, rate=0.3, calibrate=lambda r: r)[0] == 0.3
    labels = [label for label, *_ in trains.sweep_targets((0.0, 0.5), np.zeros((CFG.depth, 2, 2)), aux)]
    assert labels == ["r=0", "r=0.5", "trained"]
    dense_trained = MoDPolicy.of(CFG, ModConfig(rate=0.0))  # thresholds may be calibrated, none trained
    assert not dense_trained.skipping and dense_trained.eval_routing(aux) is DENSE
    assert dense_trained.sample_thresholds(aux) == (None, "none (dense)")
    assert dense_trained.sample_routing(jnp.zeros((CFG.depth, 2))).mode == "threshold"
    prenorm = MoDPolicy.of(dataclasses.replace(CFG, residual="prenorm"), ModConfig(rate=0.0))
    assert prenorm.mod is None and prenorm.train_routing(16) is DENSE
    assert prenorm.sample_thresholds(aux, rate=0.3) == (None, "none (dense)")
    with pytest.raises(ConfigError, match="skip signal"):
        MoDPolicy.of(dataclasses.replace(CFG, residual="prenorm"), ModConfig(rate=0.5))
    assert eligible_count(trains) == 2 * (CFG.depth - 1)  # every sublayer but the exempt first block's


def eligible_count(policy):
    return int(policy.eligible_sublayers(policy.train_routing()).sum())
