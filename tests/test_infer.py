"""Generation (nagjax/infer): one-pass prefill, real skipping at decode, batched generation.

Tiny models; the speed target lives in benchmarks/decode.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_tiny_model
from nagjax.config import ConfigError, ModConfig
from nagjax.infer.decode import block_params_fn, decode_step_fn, prefill_fn
from nagjax.infer.kv_cache import init_cache
from nagjax.infer.sample import generate_ids
from nagjax.model import StepContext, build_model
from nagjax.model.mod import MoDPolicy

CFG = make_tiny_model(residual="nag")


@functools.lru_cache(maxsize=None)
def _setup(kv: str):
    """(mod, model, graphdef, params, blocks, forward) of one tiny NAG model, with the K/V rule
    `kv`, shared by the tests; `forward(params, tokens, tau)` is the jitted full forward."""
    mod = ModConfig(rate=0.0, kv=kv, exempt_first_blocks=1)
    if kv == "kept":
        model = build_model(CFG, seed=6, mod=mod)
    else:  # the same parameters under another K/V rule
        model = _setup("kept")[1]
        model = nnx.merge(*nnx.split(model))
        model.mod_policy = MoDPolicy.of(CFG, mod)
    graphdef, params = nnx.split(model)
    policy = model.mod_policy
    forward = jax.jit(lambda p, t, tau: nnx.merge(graphdef, p)(t, ctx=StepContext(
        routing=policy.threshold_routing(tau))))
    return mod, model, graphdef, params, block_params_fn(graphdef)(params), forward


def _thresholds(kv: str, rate: float, seed: int = 11):
    """[depth, 2]: per sublayer, midway between the m of two neighbouring tokens of a random
    sequence, so that about `rate` of such tokens skip (and no m sits on tau)."""
    *_, params, _, forward = _setup(kv)
    tokens = jax.random.randint(jax.random.key(seed), (1, 12), 0, CFG.vocab_size)
    _, stats = forward(params, tokens, jnp.full((CFG.depth, 2), -jnp.inf))
    m = np.sort(np.asarray(stats["gate_by_position"]), axis=-1)  # [depth, 2, t], batch of one
    i = int(rate * m.shape[-1])
    return jnp.asarray((m[..., i - 1] + m[..., i]) / 2)


def _prefill_and_decode(kv, tokens, n_prompt, tau, *, thresholds, skip_compute):
    """Logits at every position: the first `n_prompt` tokens in one prefill (0: none, every token
    decoded from an empty cache), the rest one by one (teacher forcing); and the executed
    [depth, 2] of every decoded token."""
    *_, graphdef, params, blocks, _ = _setup(kv)
    options = dict(thresholds=thresholds, skip_compute=skip_compute)
    cache = init_cache(CFG, 1, tokens.shape[1], jnp.float32)
    out, executed = [], []
    if n_prompt:
        logits, cache, _ = prefill_fn(graphdef, **options, all_logits=True)(
            params, blocks, cache, tokens[:, :n_prompt], jnp.array([n_prompt]), tau)
        out.append(logits[0])
    step = decode_step_fn(graphdef, **options)
    for pos in range(n_prompt, tokens.shape[1]):
        logits, cache, counts = step(params, blocks, cache, tokens[:, pos], jnp.array([pos]), jnp.array([True]), tau)
        out.append(logits)
        executed.append(np.asarray(counts["executed"]))
    return np.concatenate(out), executed


@pytest.mark.parametrize("kv, thresholds", [("kept", False), ("kept", True), ("all", True)])
def test_prefill_then_decode_equals_the_full_forward_and_token_by_token(kv, thresholds):
    *_, params, _, forward = _setup(kv)
    tokens = jax.random.randint(jax.random.key(7), (1, 12), 0, CFG.vocab_size)
    tau = _thresholds(kv, 0.4) if thresholds else jnp.full((CFG.depth, 2), -jnp.inf)
    full, full_stats = forward(params, tokens, tau)  # tau -inf: every sublayer runs (the dense model)
    one_pass, executed = _prefill_and_decode(kv, tokens, 5, tau, thresholds=thresholds, skip_compute=False)
    np.testing.assert_allclose(one_pass, full[0], rtol=2e-4, atol=2e-5)
    by_token, executed_by_token = _prefill_and_decode(kv, tokens, 0, tau, thresholds=thresholds, skip_compute=False)
    np.testing.assert_allclose(one_pass, by_token, rtol=2e-4, atol=2e-5)
    skipped = np.asarray(full_stats["skip_by_position"])  # [depth, 2, t]
    np.testing.assert_array_equal(1 - np.stack(executed_by_token, axis=-1), skipped)
    np.testing.assert_array_equal(1 - np.stack(executed, axis=-1), skipped[..., 5:])
    if thresholds:
        assert 0.1 < skipped[1:].mean() < 0.9
        # really skipping: the same bits, prefill and decode
        real, executed_real = _prefill_and_decode(kv, tokens, 5, tau, thresholds=True, skip_compute=True)
        np.testing.assert_array_equal(real, one_pass)
        np.testing.assert_array_equal(executed_real, executed)


@pytest.mark.parametrize("kv", ["kept", "all"])
def test_real_skipping_never_copies_the_cache(kv):
    """A cache written inside a lax.cond branch is copied in and out of it on every step (a cost
    that grows with the context): the compiled decode step must update every block's cache in
    place, for both K/V rules."""
    *_, graphdef, params, blocks, _ = _setup(kv)
    slots = 97  # a cache length no other array of the step has
    cache = init_cache(CFG, 2, slots, jnp.float32)
    step = decode_step_fn(graphdef, thresholds=True, skip_compute=True)
    hlo = step.lower(params, blocks, cache, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32),
                     jnp.ones(2, bool), _thresholds(kv, 0.5)).compile().as_text()
    k_shape = "f32[{}]".format(",".join(map(str, cache[0]["k"].shape)))
    assert hlo.count(f" {k_shape}") > 0  # the shape as the HLO spells it
    copies = [line for line in hlo.splitlines() if f"{k_shape}" in line and " copy(" in line]
    assert copies == []


@pytest.mark.parametrize("kv", ["kept", "all"])
def test_real_skipping_in_a_batch_is_bit_identical(kv):
    """Three rows at their own positions: a sublayer is computed iff some row executes it
    (lax.cond), with the compute-and-discard path's logits bit for bit."""
    *_, graphdef, params, blocks, _ = _setup(kv)
    tau = _thresholds(kv, 0.85)
    tokens = jax.random.randint(jax.random.key(3), (3, 8), 0, CFG.vocab_size)
    starts = jnp.asarray([0, 2, 1])  # rows at their own positions (their prompts came before)
    results = {}
    for skip_compute in (False, True):
        step = decode_step_fn(graphdef, thresholds=True, skip_compute=skip_compute)
        cache = init_cache(CFG, 3, 8, jnp.float32)
        out, ran, executed = [], [], []
        for i in range(6):
            positions = starts + i
            active = jnp.asarray([True, True, i < 4])  # the last row stops
            logits, cache, counts = step(params, blocks, cache, tokens[jnp.arange(3), positions], positions,
                                         active, tau)
            out.append(logits)
            ran.append(np.asarray(counts["ran"]))
            executed.append(np.asarray(counts["executed"]))
        results[skip_compute] = np.stack(out), np.stack(ran), np.stack(executed)
    np.testing.assert_array_equal(results[True][0], results[False][0])
    np.testing.assert_array_equal(results[True][2], results[False][2])
    assert results[False][1].min() == 1  # the reference computes everything
    ran, executed = results[True][1:]
    np.testing.assert_array_equal(ran, (executed > 0).astype(ran.dtype))
    assert 0 < ran[:, 1:].mean() < 1


def test_batched_generation_equals_per_prompt_generation():
    """Prompts of different lengths in one batch (right-padded, per-row positions) generate what
    each generates alone (greedy, thresholds, really skipping); rows stop at their own EOS."""
    *_, graphdef, params, _, _ = _setup("kept")
    tau = np.asarray(_thresholds("kept", 0.3))
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, CFG.vocab_size, n)) for n in (3, 7, 5)]
    alone = [generate_ids(graphdef, params, [p], eos_id=-1, max_new_tokens=8, thresholds=tau, pad_to=7).tokens[0]
             for p in prompts]
    # an EOS that the first prompt generates at step >= 2 (and not before) stops that row early
    eos = next(tok for i, tok in enumerate(alone[0]) if i >= 2 and tok not in alone[0][:i])
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in alone]
    assert len(expected[0]) < 8 and any(len(row) == 8 for row in expected)
    batched = generate_ids(graphdef, params, prompts, eos_id=eos, max_new_tokens=8, thresholds=tau)
    assert batched.tokens == expected
    assert batched.decode_tokens == sum(len(row) - 1 for row in expected)
    assert 0 < batched.skip_rate < 1 and batched.eligible[1:].all() and not batched.eligible[0].any()
    assert batched.computed_flops_per_token > batched.flops_per_token  # rows ride along in a batch
    assert batched.flops_per_token < batched.dense_flops_per_token
    single = generate_ids(graphdef, params, [prompts[0]], eos_id=-1, max_new_tokens=8, thresholds=tau, pad_to=7)
    assert single.calls_saved == pytest.approx(single.skip_rate)  # batch 1: a skipped sublayer is not run
    assert single.computed_flops_per_token == pytest.approx(single.flops_per_token)


def test_generation_without_thresholds_runs_every_sublayer_and_checks_its_input():
    *_, graphdef, params, _, _ = _setup("kept")
    out = generate_ids(graphdef, params, [[1, 2, 3]], eos_id=-1, max_new_tokens=4, pad_to=7)
    assert len(out.tokens[0]) == 4 and out.decode_steps == 3 and out.skip_rate == 0 and out.calls_saved == 0
    assert out.tokens_per_second > 0 and out.flops_per_token == out.dense_flops_per_token
    # compiled functions are reused per argument type, the parameters' included
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert len(generate_ids(graphdef, half, [[1, 2, 3]], eos_id=-1, max_new_tokens=4, pad_to=7).tokens[0]) == 4
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(graphdef, params, [[]], eos_id=-1)
    with pytest.raises(ValueError, match="pad_to"):
        generate_ids(graphdef, params, [[1, 2, 3]], eos_id=-1, pad_to=2)
    prenorm = nnx.split(build_model(dataclasses.replace(CFG, residual="prenorm", depth=1), seed=1))
    with pytest.raises(ConfigError, match="skip signal"):
        generate_ids(*prenorm, [[1]], eos_id=-1, thresholds=np.zeros((1, 2)))
