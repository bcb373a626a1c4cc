"""The decoder: embed -> scanned stack of blocks -> head, with a pluggable residual scheme.

Block parameters are created stacked along a leading `layers` axis (`nnx.vmap`) and the forward
pass runs `lax.scan` over them, so a 48-layer model traces and compiles one block, not 48.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModelConfig
from nagjax.model.layers import Attention, SwiGLU, compute_dtype, normal, param
from nagjax.model.residual import get_scheme
from nagjax.model.residual.base import ATTENTION, MLP, State, StepContext

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Attention then MLP, each wrapped by the scheme's residual update."""

    def __init__(self, cfg: ModelConfig, block_index, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        self.residual = get_scheme(cfg.residual)[1](cfg, block_index, rngs=rngs)

    def __call__(self, state: State, positions_bt, block_index, ctx: StepContext):
        state, attn_stats = self.residual(state, self.attn, positions_bt, ATTENTION, block_index, ctx)
        state, mlp_stats = self.residual(
            state, lambda x, _positions: self.mlp(x), positions_bt, MLP, block_index, ctx
        )
        stats = {k: jnp.stack([attn_stats[k], mlp_stats[k]]) for k in attn_stats}
        return state, stats


class Transformer(nnx.Module):
    """Causal LM. `__call__(tokens_bt) -> (logits_btv float32, per-sublayer stats)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokeniser) before building")
        self.cfg = cfg
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if not cfg.tie_embeddings:
            self.head = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.stream = get_scheme(cfg.residual)[0](cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0, 0), out_axes=0)
        def make_blocks(rngs, block_index):
            return Block(cfg, block_index, rngs=rngs)

        self.blocks = make_blocks(rngs, jnp.arange(cfg.depth))

    def head_table(self):
        return self.embed[...] if self.cfg.tie_embeddings else self.head[...]

    def __call__(self, tokens_bt, positions_bt=None, *, ctx: StepContext | None = None):
        cfg = self.cfg
        ctx = ctx or StepContext()
        dtype = compute_dtype(cfg)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        table = self.stream.embedding_table(self.embed[...])
        state = self.stream.encode(jnp.take(table, tokens_bt, axis=0).astype(dtype))
        state, stats = self.run_blocks(state, positions_bt, ctx)
        logits = self.stream.logits(state, self.head_table())
        return logits.astype(jnp.float32), stats

    def run_blocks(self, state: State, positions_bt, ctx: StepContext):
        """Scan the stacked blocks; stats come back stacked as [depth, 2]."""
        graphdef, block_params = nnx.split(self.blocks)

        def body(carry, xs):
            params, block_index = xs
            block = nnx.merge(graphdef, params)
            return block(carry, positions_bt, block_index, ctx)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat])
        xs = (block_params, jnp.arange(self.cfg.depth))
        return jax.lax.scan(body, state, xs, unroll=min(self.cfg.scan_unroll, self.cfg.depth))


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
