"""The decoder: embed -> scanned stack of blocks -> head, with a pluggable residual scheme.

Block parameters are created stacked along a leading `layers` axis (`nnx.vmap`) and the forward
pass runs `lax.scan` over them, so a 48-layer model traces and compiles one block, not 48
(`model.scan_unroll >= depth` runs them one after another instead: no stacked activations). A
CascadeFormer taper (taper.py) makes one stack per stage of equal widths; Mixture-of-Depths cuts the
scan where its exempt first blocks end. The model holds its `MoDPolicy` (mod/policy.py), built once
from its ModConfig: the routing of a call without one, the segments, and what the train step,
sampling, calibration and analysis ask of it. `Block.__call__` is the one block forward: the
train step, the evaluation, KV-cache decoding (a cached attention sublayer) and the depth
microscope (an observer of every sublayer) all run it through `Transformer.run_blocks`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ModConfig, ModelConfig, PipelineConfig
from nagjax.model import loops, pipeline as pipeline_lib, taper
from nagjax.model.layers import ATTENTION, MLP, Attention, SwiGLU, compute_dtype, normal, param
from nagjax.model.mod import MoDPolicy, Routing
from nagjax.model.residual import get_scheme
from nagjax.model.residual.base import State, StepContext, Sublayer
from nagjax.sharding import constrain, constrain_stream, stage_count

# What the backward pass keeps of each block's forward (`model.remat`; "none" keeps everything):
#   full            only the block's input; the whole block is recomputed
#   dots            every matmul output without batch dimensions (projections, MLP); attention
#                   scores/softmax, norms, RoPE and the residual scheme's row work are recomputed
#   dots_attention  as dots, plus each attention output: only the cheap row work is recomputed
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention")),
}
# observe(slot, state_before, state_after, stats): sees every sublayer of a block forward.
Observer = Callable[[int, State, State, dict], None]


class Block(nnx.Module):
    """Attention then MLP, each wrapped by the scheme's residual update."""

    def __init__(self, cfg: ModelConfig, block_index, *, rngs: nnx.Rngs, residual: bool = True):
        """`residual` False: the block's residual module lives outside it, one per executed pass
        (a looped stack, loops.py); `Transformer.run_blocks` sets it before each call."""
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        if residual:
            self.residual = get_scheme(cfg.residual).block_residual(cfg, block_index, rngs=rngs)

    def sublayers(self, attention: Sublayer | None = None) -> tuple[tuple[int, Sublayer], ...]:
        """(slot, sublayer) in execution order; every sublayer is called `f(x, positions, kv=None)`.
        `attention` stands in for the block's own attention (e.g. one decoding step with a cache)."""
        return ((ATTENTION, self.attn if attention is None else attention), (MLP, self.mlp))

    def __call__(self, state: State, positions_bt, block_index, ctx: StepContext, *,
                 attention: Sublayer | None = None, observe: Observer | None = None):
        """-> (new state, stats {name: [2, ...]} stacked over (attention, MLP))."""
        per_slot = []
        for slot, sublayer in self.sublayers(attention):
            new, stats = self.residual(state, sublayer, positions_bt, slot, block_index, ctx)
            if observe is not None:
                observe(slot, state, new, stats)
            state = new
            per_slot.append(stats)
        return state, {k: jnp.stack([s[k] for s in per_slot]) for k in per_slot[0]}


def block_stack(cfg: ModelConfig, block_ids, rngs: nnx.Rngs, *, residual: bool = True) -> nnx.Module:
    """Blocks with parameters stacked on a leading `layers` axis (the model, or one taper stage)."""

    @nnx.split_rngs(splits=len(block_ids))
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def make(rngs, block_index):
        return Block(cfg, block_index, rngs=rngs, residual=residual)

    return make(rngs, jnp.asarray(block_ids))


def residual_stack(cfg: ModelConfig, positions, rngs: nnx.Rngs) -> nnx.Module:
    """One block residual per executed position of a looped stack, stacked on a leading `layers`
    axis (initialised as the residual of block `position` of an unrolled stack)."""
    scheme = get_scheme(cfg.residual)

    @nnx.split_rngs(splits=len(positions))
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def make(rngs, position):
        return scheme.block_residual(cfg, position, rngs=rngs)

    return make(rngs, jnp.asarray(positions))


def stack_paths(cfg: ModelConfig) -> list[tuple[tuple, int]]:
    """(path of the stacked block parameters in the model's state, number of blocks) per stack, in
    block order: `blocks`, or `stages/<i>` for a tapered model. Parameters, gradients and optimiser
    moments share these paths."""
    if cfg.taper == "none":
        return [(("blocks",), cfg.depth)]
    return [(("stages", i), stage.size) for i, stage in enumerate(taper.stages(cfg))]


def block_stacks_of(cfg: ModelConfig, tree) -> list[tuple[object, int]]:
    """(sub-tree, number of blocks) of each stack in a tree shaped like the model's parameters
    (parameters, gradients, an optimiser moment), in block order; leaves hold blocks on axis 0."""
    out = []
    for path, n in stack_paths(cfg):
        sub = tree
        for key in path:
            sub = sub[key]
        out.append((sub, n))
    return out


class Transformer(nnx.Module):
    """Causal LM. `__call__(tokens_bt) -> (logits_btv float32, per-sublayer stats)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mod: ModConfig | None = None,
                 policy: MoDPolicy | None = None, pipeline: PipelineConfig | None = None):
        """`policy`: the model's Mixture-of-Depths policy (`MoDPolicy.of(cfg, mod)` when not given);
        `pipeline`: how its forward pipelines on a mesh with a `stage` axis (pipeline.py)."""
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokeniser) before building")
        if policy is not None and mod is not None:
            raise ValueError("Transformer: give the ModConfig or the MoDPolicy built from it, not both")
        self.cfg = cfg
        scheme = get_scheme(cfg.residual)
        self.mod_policy = MoDPolicy.of(cfg, mod) if policy is None else policy
        self.pipeline = pipeline or PipelineConfig()
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if not cfg.tie_embeddings:
            self.head = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.stream = scheme.stream(cfg, rngs=rngs)
        loops.check(cfg)
        # a looped stack (model.repeat > 1) with the scheme's per-pass residual: one residual
        # module per executed position (`pass_residuals`), the blocks hold attention and MLP only
        self.per_pass = loops.per_pass_residual(cfg, scheme.per_pass)
        in_block = not self.per_pass
        if cfg.taper == "none":
            self.blocks = block_stack(cfg, cfg.block_index_list, rngs, residual=in_block)
        else:  # CascadeFormer: one stacked, scanned stage per run of equal MLP widths (taper.py)
            self.stages = nnx.List([
                block_stack(taper.stage_config(cfg, st), st.block_ids, rngs, residual=in_block)
                for st in taper.stages(cfg)
            ])
        if self.per_pass:
            self.pass_residuals = residual_stack(cfg, list(range(cfg.executed_depth)), rngs)

    def head_table(self):
        return self.embed[...] if self.cfg.tie_embeddings else self.head[...]

    def encode(self, tokens_bt) -> State:
        """Token ids [b, t] -> the scheme's initial stream state (batch-sharded under a mesh)."""
        # Gather from a table whose feature axis is whole (FSDP all-gathers it, as for every weight)
        # and hand the rows on batch-sharded: a gather on an fsdp-split feature axis otherwise
        # forces XLA to replicate the result and re-partition it.
        table = constrain(self.stream.embedding_table(self.embed[...]), ("vocab", None))
        x_btd = constrain(jnp.take(table, tokens_bt, axis=0), ("batch", "sequence", "act_embed"))
        return self.stream.encode(x_btd.astype(compute_dtype(self.cfg)))

    def logits(self, state: State):
        return self.stream.logits(state, self.head_table()).astype(jnp.float32)

    def forward(self, tokens_bt, positions_bt=None, *, ctx: StepContext | None = None):
        """Token ids -> (final stream state, per-sublayer stats); `logits(state)` reads it out."""
        return self.run_blocks(self.encode(tokens_bt), positions_bt, ctx)

    def __call__(self, tokens_bt, positions_bt=None, *, ctx: StepContext | None = None):
        state, stats = self.forward(tokens_bt, positions_bt, ctx=ctx)
        return self.logits(state), stats

    def routing(self, ctx: StepContext) -> Routing:
        """The call's Mixture-of-Depths routing: the context's, else the policy's training routing
        (top-k at the model's rate; dense without MoD)."""
        if ctx.routing is None:
            return self.mod_policy.train_routing()
        if ctx.routing.skips:
            self.mod_policy.require_signal(f"{ctx.routing.mode} routing")
        return ctx.routing

    def block_stacks(self) -> list[tuple[int, nnx.Module]]:
        """(position of the first block, stacked blocks): one stack, or one per taper stage."""
        if self.cfg.taper == "none":
            return [(0, self.blocks)]
        return [(st.start, stack) for st, stack in zip(taper.stages(self.cfg), self.stages)]

    def split_stacks(self) -> list[tuple[int, nnx.GraphDef, State, int]]:
        """(position of the first block, graphdef, stacked params, number of blocks) per stack."""
        out = []
        for stack_start, stack in self.block_stacks():
            graphdef, params = nnx.split(stack)
            out.append((stack_start, graphdef, params, jax.tree.leaves(params)[0].shape[0]))
        return out

    def scan_pieces(self, ctx: StepContext):
        """(graphdef, stacked params, original block indices, (lo, hi) positions in the stack, ctx)
        of each scan: the stacks cut by the Mixture-of-Depths segments (one scan without either)."""
        ids = jnp.asarray(self.cfg.block_index_list)
        segments = self.mod_policy.segments(self.routing(ctx))
        pieces = []
        for stack_start, graphdef, block_params, n in self.split_stacks():
            for start, stop, routing in segments:
                lo, hi = max(start, stack_start), min(stop, stack_start + n)
                if hi <= lo:
                    continue
                params = block_params
                if (lo, hi) != (stack_start, stack_start + n):
                    params = jax.tree.map(lambda x, a=lo - stack_start, b=hi - stack_start: x[a:b], block_params)
                seg_ctx = dataclasses.replace(ctx, routing=routing)
                pieces.append((graphdef, params, ids[lo:hi], (lo, hi), seg_ctx))
        return pieces

    def loop_pieces(self, ctx: StepContext):
        """A looped stack's scans (loops.py): (graphdef, whole stack params, rows of the executed
        blocks in that stack [n], (lo, hi) executed positions, ctx), cut where the executed
        sequence changes stack or Mixture-of-Depths segment (segments count executed positions)."""
        seq = loops.executed(self.cfg)
        stacks = self.split_stacks()
        starts = [start for start, _, _, _ in stacks]

        def stack_of(block: int) -> int:
            return max(i for i, start in enumerate(starts) if start <= block)

        pieces = []
        for start, stop, routing in self.mod_policy.segments(self.routing(ctx)):
            seg_ctx = dataclasses.replace(ctx, routing=routing)
            lo = start
            while lo < stop:
                s = stack_of(seq[lo].block)
                hi = lo
                while hi < stop and stack_of(seq[hi].block) == s:
                    hi += 1
                stack_start, graphdef, params, _ = stacks[s]
                rows = jnp.asarray([seq[p].block - stack_start for p in range(lo, hi)], jnp.int32)
                pieces.append((graphdef, params, rows, (lo, hi), seg_ctx))
                lo = hi
        return pieces

    def block_params(self):
        """Every block's parameters on their own (slices of the stacks), in block order: the
        `blocks` of `run_blocks`. A looped stack: (that list, the per-pass residuals' parameters
        per executed position, or None when the residual is the block's)."""
        per_block = [jax.tree.map(lambda x, j=j: x[j], params)
                     for _, _, params, n in self.split_stacks() for j in range(n)]
        if not loops.is_looped(self.cfg):
            return per_block
        residuals = None
        if self.per_pass:
            _, res_params = nnx.split(self.pass_residuals)
            residuals = [jax.tree.map(lambda x, p=p: x[p], res_params) for p in range(self.cfg.executed_depth)]
        return per_block, residuals

    def run_blocks(self, state: State, positions_bt=None, ctx: StepContext | None = None, *,
                   call=None, per_block=None, side=None, blocks=None):
        """Scan the stacked blocks; per-block outputs come back stacked as [depth, ...].

        `call(block, carry, positions_bt, block_index, ctx, extra) -> (carry, ys)` wraps the
        block forward (e.g. with a cached attention sublayer, or an observer), with `extra` the
        block's slice of `per_block` (a pytree with a leading [depth] axis). `side` is carried
        through the whole scan beside the state (e.g. every block's KV cache, updated in place
        rather than sliced and restacked); with it the carry is `(state, side)`, for `call` and
        in the result.

        `blocks` (from `block_params`, sliced once outside a decoding loop) runs the blocks one
        after another instead of scanning them. A scan copies each block's weights out of the
        stack on every step, whether or not a sublayer runs; with `blocks` a decoding step reads
        the weights where they are, and a sublayer skipped under `lax.cond` costs nothing.
        """
        ctx = ctx or StepContext()
        if positions_bt is None:
            b, t = jax.tree.leaves(state)[0].shape[:2]
            positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
        stages = stage_count()
        if stages > 1 and call is None and side is None and blocks is None and per_block is None:
            return self._run_pipelined(state, positions_bt, ctx, stages)
        if side is not None:
            state = (state, side)

        def run(block, carry, block_index, extra, tau, seg_ctx):
            # batch-sharded stream
            carry = constrain_stream(carry) if side is None else (constrain_stream(carry[0]), carry[1])
            if tau is not None:  # this block's thresholds [2] (rows follow stack positions)
                seg_ctx = dataclasses.replace(seg_ctx, routing=dataclasses.replace(seg_ctx.routing, tau=tau))
            if call is None:
                return block(carry, positions_bt, block_index, seg_ctx)
            return call(block, carry, positions_bt, block_index, seg_ctx, extra)

        def body(graphdef, carry, xs, seg_ctx):
            params, block_index, extra, tau = xs
            return run(nnx.merge(graphdef, params), carry, block_index, extra, tau, seg_ctx)

        if loops.is_looped(self.cfg):
            return self._run_looped(state, ctx, per_block, run, blocks)
        if blocks is not None:
            return self._run_unstacked(blocks, state, ctx, per_block, body)
        outputs = []
        for graphdef, params, block_ids, (lo, hi), seg_ctx in self.scan_pieces(ctx):
            extra = None if per_block is None else jax.tree.map(lambda x, a=lo, b=hi: x[a:b], per_block)
            tau = seg_ctx.routing.tau
            xs = (params, block_ids, extra, None if tau is None else jnp.asarray(tau, jnp.float32)[lo:hi])
            state, ys = self._scan(functools.partial(body, graphdef, seg_ctx=seg_ctx), state, xs, len(block_ids))
            outputs.append(ys)
        return state, _joined(outputs)

    def _scan(self, body_fn, state, xs, n: int):
        """One scan of `body_fn` over `n` blocks: rematerialised per `model.remat`, and one block
        after another instead when `model.scan_unroll` >= n > 1 (a full unroll)."""
        if self.cfg.remat != "none":
            body_fn = jax.checkpoint(body_fn, policy=REMAT_POLICIES[self.cfg.remat])
        if self.cfg.scan_unroll > 1 and self.cfg.scan_unroll >= n:
            return _unrolled_scan(body_fn, state, xs, n)
        return jax.lax.scan(body_fn, state, xs, unroll=self.cfg.scan_unroll)

    def _run_looped(self, state, ctx: StepContext, per_block, run, blocks):
        """`run_blocks` on a looped stack: one scan step per executed position, which gathers its
        block's shared weights from the stack by row (so the gradient of a shared weight is the sum
        over its passes) and takes its per-pass residual parameters as scanned input; the residual
        sees the executed position as its block index. `blocks` (from `block_params`): one executed
        block after another, as `_run_unstacked`."""
        res_graphdef = res_params = None
        if self.per_pass:
            res_graphdef, res_params = nnx.split(self.pass_residuals)

        def assemble(graphdef, params, res):
            block = nnx.merge(graphdef, params)
            if res is not None:
                block.residual = nnx.merge(res_graphdef, res)
            return block

        def tau_of(routing, lo, hi=None):
            if routing.tau is None:
                return None
            tau = jnp.asarray(routing.tau, jnp.float32)
            return tau[lo] if hi is None else tau[lo:hi]

        if blocks is not None:
            block_list, res_list = blocks
            seq = loops.executed(self.cfg)
            graphdefs = [graphdef for _, graphdef, _, n in self.split_stacks() for _ in range(n)]
            ys = []
            for start, stop, routing in self.mod_policy.segments(self.routing(ctx)):
                seg_ctx = dataclasses.replace(ctx, routing=routing)
                for p in range(start, stop):
                    b = seq[p].block
                    block = assemble(graphdefs[b], block_list[b], None if res_list is None else res_list[p])
                    extra = None if per_block is None else jax.tree.map(lambda x, p=p: x[p], per_block)
                    state, y = run(block, state, jnp.int32(p), extra, tau_of(routing, p), seg_ctx)
                    ys.append(y)
            return state, jax.tree.map(lambda *xs: jnp.stack(xs), *ys)

        outputs = []
        for graphdef, stack_params, rows, (lo, hi), seg_ctx in self.loop_pieces(ctx):
            def body_fn(carry, xs, graphdef=graphdef, stack_params=stack_params, seg_ctx=seg_ctx):
                row, position, res, extra, tau = xs
                params = jax.tree.map(lambda x: x[row], stack_params)  # the shared weights of this pass
                return run(assemble(graphdef, params, res), carry, position, extra, tau, seg_ctx)

            res = None if res_params is None else jax.tree.map(lambda x, a=lo, b=hi: x[a:b], res_params)
            extra = None if per_block is None else jax.tree.map(lambda x, a=lo, b=hi: x[a:b], per_block)
            xs = (rows, jnp.arange(lo, hi, dtype=jnp.int32), res, extra, tau_of(seg_ctx.routing, lo, hi))
            state, ys = self._scan(body_fn, state, xs, hi - lo)
            outputs.append(ys)
        return state, _joined(outputs)

    def _run_pipelined(self, state, positions_bt, ctx: StepContext, stages: int):
        """`run_blocks` on a mesh with `stages` pipeline stages (pipeline.py): each piece of k
        executed positions is one scan of the block forward, vmapped over the stages. Under a
        Mixture-of-Depths routing the exempt first blocks fall in piece 0, but every stage runs
        the same program: the first min(exempt, k) slots of a piece run both the dense and the
        routed forward and keep the one their executed position asks for."""
        sched = pipeline_lib.schedule(self.cfg, self.pipeline, stages)
        scheme = get_scheme(self.cfg.residual)
        routing = self.routing(ctx)
        _, graphdef, stack_params, _ = self.split_stacks()[0]
        inputs = {"weights": pipeline_lib.arrange_stack(stack_params, self.cfg, sched)}
        res_graphdef = None
        if self.per_pass:
            res_graphdef, res_params = nnx.split(self.pass_residuals)
            inputs["residuals"] = pipeline_lib.arrange_positions(res_params, sched)
        if routing.tau is not None:
            tau = jnp.asarray(routing.tau, jnp.float32)
            inputs["tau"] = tau.reshape((sched.repeats, sched.stages, sched.per_piece) + tau.shape[1:])
        k = sched.per_piece
        exempt = routing.config.exempt_first_blocks if routing.skips else 0
        dense_ctx = dataclasses.replace(ctx, routing=dataclasses.replace(routing, mode="dense"))
        routed_ctx = dataclasses.replace(ctx, routing=routing)

        def piece_fn(start, stage_inputs, repeat, piece, positions):
            first = piece * k  # the executed position of the piece's first block

            def forward(carry, j, seg_ctx):
                # this block's row of the stage's inputs, read inside the (rematerialised) block
                mine = jax.tree.map(lambda x: x[repeat, j], stage_inputs)
                block = nnx.merge(graphdef, mine["weights"])
                if "residuals" in mine:
                    block.residual = nnx.merge(res_graphdef, mine["residuals"])
                carry = constrain_stream(carry)
                if "tau" in mine:
                    routing_j = dataclasses.replace(seg_ctx.routing, tau=mine["tau"])
                    seg_ctx = dataclasses.replace(seg_ctx, routing=routing_j)
                return block(carry, positions, first + j, seg_ctx)

            def either(carry, j):
                dense, routed = forward(carry, j, dense_ctx), forward(carry, j, routed_ctx)
                return jax.tree.map(lambda a, b: jnp.where(first + j < exempt, a, b), dense, routed)

            slots = jnp.arange(k, dtype=jnp.int32)
            both = min(exempt, k)
            outputs = []
            if both:
                start, ys = self._scan(either, start, slots[:both], both)
                outputs.append(ys)
            if both < k:
                start, ys = self._scan(functools.partial(forward, seg_ctx=routed_ctx), start, slots[both:], k - both)
                outputs.append(ys)
            return start, _joined(outputs)

        cross = pipeline_lib.WholeState()
        if scheme.cross_stage is not None and self.pipeline.cross_stage_cache:
            cross = scheme.cross_stage(self.cfg, sched)
        state, ys = pipeline_lib.run(sched, state, positions_bt, piece_fn, cross, inputs)
        # the head and the loss then run on each row once, not once per stage
        return constrain_stream(state, over_stages=True), ys

    def _run_unstacked(self, blocks: list, carry, ctx: StepContext, per_block, body):
        """`run_blocks` over per-block parameters, one block after another (same segments)."""
        graphdefs = [graphdef for _, graphdef, _, n in self.split_stacks() for _ in range(n)]
        if len(blocks) != len(graphdefs):
            raise ValueError(f"run_blocks: {len(blocks)} block parameter trees for {len(graphdefs)} blocks")
        ids = self.cfg.block_index_list
        ys = []
        for start, stop, routing in self.mod_policy.segments(self.routing(ctx)):
            seg_ctx = dataclasses.replace(ctx, routing=routing)
            for i in range(start, stop):
                extra = None if per_block is None else jax.tree.map(lambda x, i=i: x[i], per_block)
                tau = None if routing.tau is None else jnp.asarray(routing.tau, jnp.float32)[i]
                carry, y = body(graphdefs[i], carry, (blocks[i], jnp.int32(ids[i]), extra, tau), seg_ctx)
                ys.append(y)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *ys)


def _joined(outputs: list):
    """The per-block outputs of consecutive scans, as one [blocks, ...] tree."""
    if len(outputs) == 1:
        return outputs[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)


def _unrolled_scan(f, carry, xs, length: int):
    """`lax.scan(f, carry, xs)` as straight-line code: each block's activations stay in buffers of
    their own (no stacked saved activations to write and slice out again). Not `lax.scan(...,
    unroll=length)`: inside a scan jax drops the optimisation barriers of a rematerialised body
    (the loop keeps XLA from merging the recomputation with the forward), and unrolled, XLA then
    merges them and the remat is lost; called here, `jax.checkpoint` keeps its barriers."""
    ys = []
    for j in range(length):
        carry, y = f(carry, jax.tree.map(lambda x, j=j: x[j], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def build_model(cfg: ModelConfig, seed: int = 0, mod: ModConfig | None = None, *,
                policy: MoDPolicy | None = None, pipeline: PipelineConfig | None = None) -> Transformer:
    """The model, with its Mixture-of-Depths policy: `policy`, else the one of `mod` (None: dense),
    and how its forward pipelines on a mesh with stages (`pipeline`; None: the defaults)."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed), mod=mod, policy=policy, pipeline=pipeline)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
