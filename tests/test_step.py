"""The train step's memory levers compute the same function: chunked token losses, gradient
accumulation over microbatches, and every rematerialisation policy; its optimiser is optax's AdamW,
skipping a bad step in place."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nagjax.analysis import hlo
from nagjax.config import Config, apply_overrides
from nagjax.infer.calibration import calibrate_thresholds
from nagjax.model import build_model
from nagjax.train.loss import AUTO_LOGITS_BYTES, chunk_length, cross_entropy, token_losses
from nagjax.train import optim
from nagjax.train.state import training_state

TOKENS = jax.random.randint(jax.random.key(0), (2, 13), 0, 97)


def test_chunk_sizes():
    assert chunk_length(8, 128, 4096, 0) == 128  # 16 MiB of logits: whole sequences
    big = chunk_length(16, 2048, 32768, 0)  # 16 x 2048 tokens on one device: 4 GiB of logits
    assert 16 * big * 32768 * 4 <= AUTO_LOGITS_BYTES and big == 128
    assert chunk_length(16, 2048, 32768, -1) == 2048 and chunk_length(4, 100, 10, 40) == 10


@pytest.mark.parametrize("residual", ["prenorm", "nag"])
def test_chunked_losses_and_gradients_equal_the_whole_batch(residual, tiny_model):
    graphdef, params = nnx.split(build_model(tiny_model(residual=residual)), nnx.Param)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]

    def loss(p, chunk):
        model = nnx.merge(graphdef, p)
        state, _ = model.forward(inputs)
        return jnp.mean(token_losses(model.logits, state, targets, chunk))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    whole, g_whole = value_and_grad(params, 12)
    chunked, g_chunked = value_and_grad(params, 5)  # 12 positions: 3 chunks, the last padded
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    assert_same_gradients(g_chunked, g_whole)
    per_token = token_losses(nnx.merge(graphdef, params).logits, nnx.merge(graphdef, params).forward(inputs)[0],
                             targets, 5)
    np.testing.assert_allclose(per_token, cross_entropy(nnx.merge(graphdef, params)(inputs)[0], targets), rtol=1e-6)
    # No array of the whole batch's logits exists in the chunked computation, forward or backward.
    shapes = _value_shapes(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, 5).jaxpr)
    assert not [s for s in shapes if s and s[-1] == 97 and np.prod(s[:-1]) > 2 * 5]  # one chunk at most


def _value_shapes(jaxpr) -> list[tuple]:
    """Shapes of every value a jaxpr computes, inside scans, remat and custom rules too."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [v.aval.shape for v in eqn.outvars]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _value_shapes(inner)
    return shapes


def assert_same_gradients(grads, reference):
    """Equal up to float32 rounding, measured against each gradient's own scale (NAG's
    normalisations turn reordered sums into ~1e-7 absolute differences on tiny entries)."""
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def _train(overrides, steps=2):
    cfg = apply_overrides(Config(), [
        "model.residual=nag", "model.d_model=32", "model.depth=2", "model.n_heads=2", "model.d_ff=64",
        "model.vocab_size=97", "model.compute_dtype=float32", "data.seq_len=12", "data.batch_size=4",
        "optim.warmup_steps=0", "mod.rate=0.25", *overrides])
    spec = training_state(cfg)
    state = spec.init()
    tokens = jax.random.randint(jax.random.key(1), (4, 13), 0, 97)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    for i in range(steps):
        state, metrics = spec.steps.train(state, batch, i)
        losses.append(float(metrics["loss"]))
    return losses, state, metrics


def test_gradient_accumulation_equals_one_large_batch():
    losses, state, metrics = _train([])
    acc_losses, acc_state, acc_metrics = _train(["train.grad_accum=2"])
    np.testing.assert_allclose(acc_losses, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_state["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(acc_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-4)
    # MoD statistics are microbatch means: the skip rates match, and the thresholds (the EMA of
    # the microbatches' mean quantile instead of the batch's) stay close to one batch's
    np.testing.assert_allclose(acc_metrics["layers"]["skip_rate"], metrics["layers"]["skip_rate"], rtol=1e-6)
    tau, acc_tau = state["aux"]["mod_tau"], acc_state["aux"]["mod_tau"]
    assert float(jnp.abs(tau[1:]).min()) > 0.1  # the routed blocks' thresholds did move
    np.testing.assert_allclose(acc_tau, tau, atol=0.05)
    with pytest.raises(Exception, match="train.grad_accum: must divide data.batch_size=4"):
        _train(["train.grad_accum=3"])


def test_remat_policies_and_unrolling_compute_the_same_gradients(tiny_model):
    def value_and_grads(remat, unroll=1):  # NAG: the scheme with the most row work to recompute
        cfg = dataclasses.replace(tiny_model(residual="nag", depth=2), remat=remat, scan_unroll=unroll)
        graphdef, params = nnx.split(build_model(cfg), nnx.Param)
        loss = lambda p: jnp.mean(cross_entropy(nnx.merge(graphdef, p)(TOKENS[:, :-1])[0], TOKENS[:, 1:]))
        return jax.jit(jax.value_and_grad(loss))(params)

    base_loss, base_grads = value_and_grads("none")
    for remat, unroll in (("full", 1), ("dots", 1), ("dots_attention", 1), ("full", 2)):
        loss, grads = value_and_grads(remat, unroll)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        assert_same_gradients(grads, base_grads)


def test_an_unrolled_stack_keeps_the_barriers_that_keep_remat():
    """Unrolled, nothing but jax.checkpoint's optimisation barriers keeps XLA from merging a
    block's recomputation with its forward (CSE), i.e. from undoing the remat; `lax.scan(...,
    unroll=depth)` drops them (inside a scan the loop did that job), the unrolled stack keeps one
    per block. (XLA:CPU saves no memory by remat outside a loop at all, so the barriers, not the
    memory, are what a CPU can check.)"""
    cfg = apply_overrides(Config(), ["model.d_model=32", "model.depth=3", "model.n_heads=2", "model.d_ff=64",
                                     "model.vocab_size=97", "data.seq_len=16", "data.batch_size=2",
                                     "model.remat=full", "model.scan_unroll=3", "train.loss_chunk_tokens=-1"])
    spec = training_state(cfg)
    tokens = jnp.zeros((2, 16), jnp.int32)
    lowered = spec.steps.train.lower(spec.abstract, {"inputs": tokens, "targets": tokens}, 0).as_text()
    assert "stablehlo.while" not in lowered and lowered.count("optimization_barrier") >= 3


EVAL_CASES = {
    "prenorm": ["model.residual=prenorm"], "lns": ["model.residual=lns"],
    "attnres": ["model.residual=attnres", "model.attnres.block_size=2"], "nag": ["model.residual=nag"],
    "nag_mod_kept": ["model.residual=nag", "mod.rate=0.5"],
    "nag_mod_all": ["model.residual=nag", "mod.rate=0.5", "mod.kv=all", "mod.exempt_first_blocks=0"],
    "nag_mod_mlp": ["model.residual=nag", "mod.rate=0.25", "mod.sublayers=mlp"],
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_evaluation_is_causal(case):
    """Changing the last input token never moves an earlier token's validation loss, for every
    scheme and Mixture-of-Depths setting (MoD evaluates with thresholds, not top-k)."""
    cfg = apply_overrides(Config(), [
        "model.d_model=32", "model.depth=3", "model.n_heads=2", "model.d_ff=64", "model.vocab_size=97",
        "model.compute_dtype=float32", "data.seq_len=16", "data.batch_size=2", *EVAL_CASES[case]])
    spec = training_state(cfg)
    state = spec.init()
    tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 97)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    aux = state["aux"]
    if cfg.mod.rate > 0:  # thresholds that skip about the training rate (a trained run's EMA)
        tau = calibrate_thresholds(spec.graphdef, state["params"], [batch], (cfg.mod.rate,))
        aux = {**aux, "mod_tau": jnp.asarray(tau[..., 0])}
    changed = {**batch, "inputs": batch["inputs"].at[:, -1].set((batch["inputs"][:, -1] + 1) % 97)}
    before = spec.steps.eval_losses(state["params"], aux, batch)
    after = spec.steps.eval_losses(state["params"], aux, changed)
    np.testing.assert_array_equal(after[:, :-1], before[:, :-1])
    assert float(jnp.abs(after[:, -1] - before[:, -1]).max()) > 0
    if cfg.mod.rate > 0:
        out = spec.steps.eval(state["params"], aux, batch)
        assert 0 < float(out["skip_rate"][1:].mean()) < 1 and "loss_topk_sum" in out


def test_adamw_is_optax_adamw_and_a_skip_keeps_its_state():
    lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    ours, theirs = (make(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1) for make in (optim.adamw, optax.adamw))
    params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
    state, reference = ours.init(params), theirs.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(reference)  # checkpoints unchanged
    for i in range(4):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params)
        updates, state = ours.update(grads, state, params, skip=jnp.asarray(False))
        expected, reference = theirs.update(grads, reference, params)
        for a, b in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((expected, reference))):
            np.testing.assert_array_equal(a, b)  # bit for bit
    nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    _, skipped = jax.jit(ours.update)(nan_grads, state, params, skip=jnp.asarray(True))
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_what_the_compiled_train_step_moves():
    """In place: no copy of a donated input (parameter, moment, accumulator; the bad-step guard used
    to select the old optimiser state after the update, and XLA copied every moment once per
    step). Unrolled: the scan writes each saved activation into a stacked buffer and slices it out
    again in the backward pass (on a GPU: DUS kernels and memcpys); `model.scan_unroll=depth`
    keeps every block's activations in buffers of their own."""
    def compiled_text(unroll):
        cfg = apply_overrides(Config(), ["model.residual=prenorm", "model.d_model=32", "model.depth=3",
                                         "model.n_heads=2", "model.d_ff=64", "model.vocab_size=97",
                                         "data.seq_len=16", "data.batch_size=2", f"model.scan_unroll={unroll}"])
        spec = training_state(cfg)
        tokens = jnp.zeros((2, 16), jnp.int32)
        return spec.steps.train.lower(spec.abstract, {"inputs": tokens, "targets": tokens}, 0).compile().as_text()

    scanned_text, unrolled_text = compiled_text(1), compiled_text(3)
    assert sum(" parameter(" in line for line in scanned_text.splitlines()) > 20
    assert hlo.copied_inputs(scanned_text) == [] and hlo.copied_inputs(unrolled_text) == []
    scanned, unrolled = hlo.data_movement(scanned_text), hlo.data_movement(unrolled_text)
    assert scanned["loops"]["count"] >= 2 and scanned["stacked write"]["bytes"] > 0 and scanned["slice"]["count"] > 0
    assert unrolled["loops"]["count"] == 0
    for kind in ("stacked write", "slice"):
        assert unrolled[kind]["count"] == 0
    assert unrolled["copy"]["bytes"] < 0.05 * scanned["copy"]["bytes"]
