"""Attention Residuals (docs/methods.md §4): Pre-LN equivalence at init (at the default norm_eps),
Full/one-block limits, causality, gradients, and the fixed-size source buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_tiny_model
from nagjax.model.residual.attnres import AttnResConfig
from nagjax.model import build_model
from nagjax.model.residual.attnres import n_sources

TINY = dict(n_heads=2)  # default norm_eps (1e-6): the README's claim holds at default settings


def _attnres(block_size, **kw):
    return make_tiny_model(residual="attnres", options=(AttnResConfig(block_size=block_size),), **{**TINY, **kw})


def _copy_shared(src, dst):
    """Copy every parameter of `src` whose path exists in `dst` (the shared Pre-LN weights)."""
    src_flat = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
    state = nnx.state(dst, nnx.Param)
    flat = nnx.to_flat_state(state)
    copied = 0
    for path, var in flat:
        if path in src_flat:
            var.set_value(src_flat[path].get_value())
            copied += 1
    nnx.update(dst, nnx.from_flat_state(flat))
    return copied


def _forward(model):
    graphdef, params = nnx.split(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    return jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t))


TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 97)


@pytest.mark.parametrize("block_size", [1, 2, 6])  # Full, Block, one block of all 2L sublayers
def test_init_equals_prenorm_with_shared_weights(block_size):
    pre = build_model(make_tiny_model(residual="prenorm", **TINY), seed=1)
    ar = build_model(_attnres(block_size), seed=2)
    assert _copy_shared(pre, ar) == len(nnx.to_flat_state(nnx.state(pre, nnx.Param)))
    a, _ = _forward(pre)(nnx.state(pre, nnx.Param), TOKENS)
    b, stats = _forward(ar)(nnx.state(ar, nnx.Param), TOKENS)
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(stats["mix_entropy_ratio"], 1.0, rtol=1e-5)  # uniform weights


def test_source_buffer_layout():
    depth = make_tiny_model().depth
    assert n_sources(_attnres(1)) == 1 + 2 * depth  # Full: embedding + every sublayer output
    assert n_sources(_attnres(2)) == 1 + depth  # one source per Transformer block
    assert n_sources(_attnres(2 * depth)) == 2  # embedding + one running sum
    # Sources at sublayer l: the embedding and ceil(l / S) blocks; check through the mix weights.
    ar = build_model(_attnres(2), seed=0)
    res = ar.blocks.residual
    assert [int(res.slot_of(i, s)) for i in range(depth) for s in (0, 1)] == [1, 1, 2, 2, 3, 3]


def _with_random_queries(model, scale=3.0):
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    new = [x + scale * jax.random.normal(k, x.shape) if "query" in jax.tree_util.keystr(p) else x
           for p, x, k in zip(paths, leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("block_size", [1, 6])
def test_full_and_single_block_limits(block_size):
    """S = 1: sublayer l sees the embedding and each earlier output separately; S = 2L: the
    embedding and one running sum. Checked against a direct loop over sublayers."""
    cfg = _attnres(block_size, depth=3)
    graphdef, params = _with_random_queries(build_model(cfg, seed=4))
    model = nnx.merge(graphdef, params)
    tokens = TOKENS[:, :5]
    logits, _ = model(tokens)

    # Direct reference: keep the list of sources explicitly.
    emb = jnp.take(model.embed[...], tokens, axis=0)
    outputs = []  # sublayer outputs in order
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def sources_now():
        if block_size == 1:
            return [emb] + outputs
        return [emb] + ([sum(outputs)] if outputs else [])

    def mix(query, gain, srcs):  # n * sum_i a_i v_i over the n sources (§4)
        v = jnp.stack(srcs, axis=2)
        k = v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + cfg.norm_eps) * gain
        a = jax.nn.softmax(jnp.einsum("btnd,d->btn", k, query), axis=-1)
        return jnp.einsum("btn,btnd->btd", a, v) * len(srcs)

    def norm(x, scale):
        return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

    blocks = model.blocks
    for i in range(cfg.depth):
        blk = jax.tree.map(lambda x: x[i], nnx.state(blocks))
        one = nnx.merge(nnx.graphdef(blocks), blk)
        for slot, fn in ((0, lambda x: one.attn(x, pos)), (1, one.mlp)):
            r = one.residual.routers[slot]
            h = mix(r.query[...], r.key_norm.scale[...], sources_now())
            outputs.append(fn(norm(h, one.residual.norms[slot].scale[...])))
    fr = model.stream.final_router
    h = mix(fr.query[...], fr.key_norm.scale[...], sources_now())
    ref = norm(h, model.stream.final_norm.scale[...]) @ model.head[...].T
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 4])
def test_causal(block_size):
    graphdef, params = _with_random_queries(build_model(_attnres(block_size), seed=3))
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    base = fwd(params, TOKENS)
    for t in (2, 6):
        changed = TOKENS.at[:, t].set((TOKENS[:, t] + 1) % 97)
        out = fwd(params, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert float(jnp.abs(out[:, t] - base[:, t]).max()) > 0


def test_gradients_finite_and_reach_every_parameter():
    graphdef, params = _with_random_queries(build_model(_attnres(2), seed=5), scale=0.5)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(TOKENS)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0, path
