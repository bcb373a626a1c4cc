"""The decoder: embed -> scanned stack of blocks -> head, with a pluggable residual scheme.

Block parameters are created stacked along a leading `layers` axis (`nnx.vmap`) and the forward
pass runs `lax.scan` over them, so a 48-layer model traces and compiles one block, not 48.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModConfig, ModelConfig
from nagjax.sharding import constrain, constrain_stream
from nagjax.model import taper
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
            state, lambda x, _positions, **_kv: self.mlp(x), positions_bt, MLP, block_index, ctx
        )
        stats = {k: jnp.stack([attn_stats[k], mlp_stats[k]]) for k in attn_stats}
        return state, stats


class Transformer(nnx.Module):
    """Causal LM. `__call__(tokens_bt) -> (logits_btv float32, per-sublayer stats)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mod: ModConfig | None = None):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokeniser) before building")
        self.cfg = cfg
        self.mod = mod if mod is not None and cfg.residual == "nag" else None
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if not cfg.tie_embeddings:
            self.head = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.stream = get_scheme(cfg.residual)[0](cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0, 0), out_axes=0)
        def make_blocks(rngs, block_index):
            return Block(cfg, block_index, rngs=rngs)

        if cfg.taper == "none":
            self.blocks = make_blocks(rngs, jnp.asarray(cfg.block_index_list))
        else:  # CascadeFormer: one stacked, scanned stage per run of equal MLP widths (taper.py)
            self.stages = nnx.List([
                _block_stack(taper.stage_config(cfg, st), st.block_ids, rngs) for st in taper.stages(cfg)
            ])

    def head_table(self):
        return self.embed[...] if self.cfg.tie_embeddings else self.head[...]

    def __call__(self, tokens_bt, positions_bt=None, *, ctx: StepContext | None = None):
        cfg = self.cfg
        ctx = ctx or StepContext()
        dtype = compute_dtype(cfg)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        # Gather from a table whose feature axis is whole (FSDP all-gathers it, as for every weight)
        # and hand the rows on batch-sharded: a gather on an fsdp-split feature axis otherwise
        # forces XLA to replicate the result and re-partition it.
        table = constrain(self.stream.embedding_table(self.embed[...]), ("vocab", None))
        x_btd = constrain(jnp.take(table, tokens_bt, axis=0), ("batch", "sequence", "act_embed"))
        state = self.stream.encode(x_btd.astype(dtype))
        state, stats = self.run_blocks(state, positions_bt, ctx)
        logits = self.stream.logits(state, self.head_table())
        return logits.astype(jnp.float32), stats

    def segments(self, ctx: StepContext) -> list[tuple[int, int, StepContext]]:
        """Runs of blocks scanned together: Mixture-of-Depths exempts the first blocks, so they
        are one dense scan and the rest one skipping scan (static code paths, no per-block cond)."""
        depth = self.cfg.depth
        mod = ctx.mod if ctx.mod is not None else self.mod
        if mod is None or (mod.rate == 0 and ctx.mod_mode == "topk"):
            return [(0, depth, dataclasses.replace(ctx, mod=None))]
        exempt = min(mod.exempt_first_blocks, depth)
        parts = [(0, exempt, dataclasses.replace(ctx, mod=None)), (exempt, depth, dataclasses.replace(ctx, mod=mod))]
        return [p for p in parts if p[1] > p[0]]

    def block_stacks(self) -> list[tuple[int, nnx.Module]]:
        """(position of the first block, stacked blocks): one stack, or one per taper stage."""
        if self.cfg.taper == "none":
            return [(0, self.blocks)]
        return [(st.start, stack) for st, stack in zip(taper.stages(self.cfg), self.stages)]

    def scan_pieces(self, ctx: StepContext):
        """(graphdef, stacked params, original block indices, (lo, hi) positions in the stack, ctx)
        of each scan: the segments cut by the taper stages (taper=none and no MoD: one scan)."""
        ids = jnp.asarray(self.cfg.block_index_list)
        pieces = []
        for stack_start, stack in self.block_stacks():
            graphdef, block_params = nnx.split(stack)
            n = jax.tree.leaves(block_params)[0].shape[0]
            for start, stop, seg_ctx in self.segments(ctx):
                lo, hi = max(start, stack_start), min(stop, stack_start + n)
                if hi <= lo:
                    continue
                params = block_params
                if (lo, hi) != (stack_start, stack_start + n):
                    params = jax.tree.map(lambda x, a=lo - stack_start, b=hi - stack_start: x[a:b], block_params)
                pieces.append((graphdef, params, ids[lo:hi], (lo, hi), seg_ctx))
        return pieces

    def run_blocks(self, state: State, positions_bt, ctx: StepContext, *, call=None, per_block=None):
        """Scan the stacked blocks; per-block outputs (stats) come back stacked as [depth, ...].

        `call(block, carry, positions_bt, block_index, ctx, extra) -> (carry, ys)` replaces the
        block's own forward (e.g. one decoding step against a KV cache), with `extra` the block's
        slice of `per_block` (a pytree with a leading [depth] axis, e.g. the cache).
        """
        outputs = []
        for graphdef, params, block_ids, (lo, hi), seg_ctx in self.scan_pieces(ctx):

            def body(carry, xs, seg_ctx=seg_ctx):
                params, block_index, extra = xs
                block = nnx.merge(graphdef, params)
                carry = constrain_stream(carry)  # batch-sharded
                if call is None:
                    return block(carry, positions_bt, block_index, seg_ctx)
                return call(block, carry, positions_bt, block_index, seg_ctx, extra)

            if self.cfg.remat != "none":
                body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat])
            extra = None if per_block is None else jax.tree.map(lambda x, a=lo, b=hi: x[a:b], per_block)
            xs = (params, block_ids, extra)
            state, ys = jax.lax.scan(body, state, xs, unroll=min(self.cfg.scan_unroll, len(block_ids)))
            outputs.append(ys)
        if len(outputs) == 1:
            return state, outputs[0]
        return state, jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)


def _block_stack(cfg: ModelConfig, block_ids, rngs: nnx.Rngs) -> nnx.Module:
    """Blocks with parameters stacked on a leading `layers` axis (one taper stage)."""

    @nnx.split_rngs(splits=len(block_ids))
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def make(rngs, block_index):
        return Block(cfg, block_index, rngs=rngs)

    return make(rngs, jnp.asarray(block_ids))


def build_model(cfg: ModelConfig, seed: int = 0, mod: ModConfig | None = None) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(params=seed), mod=mod)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
