"""Pipeline parallelism over the `stage` mesh axis (docs/pipeline.md), inside the one jitted step.

The E executed block positions (loops.py; E = depth without `model.repeat`) are cut into
p x v contiguous *pieces* of k = E / (p v) positions, p = `mesh.stage`, v = `pipeline.repeats`;
piece q = r p + s runs on stage s (its r-th repeat). A batch is split into m =
`pipeline.microbatches` microbatches that enter stage 0 one per iteration; every iteration each
stage runs its current piece on the microbatch it holds, and the results move one stage on. The
stages are a `vmap`ped axis sharded over `stage` (`spmd_axis_name`), so the move is a `jnp.roll`
of a stage-sharded array that XLA lowers to a collective-permute, and everything else a stage does
is local. This is MaxText's `layers/pipeline.py` design; a hand-written per-device program
(`shard_map`) would only be needed for heterogeneous stages, which nagjax rejects (`check`).

Microbatch i runs piece q at iteration t = r m + i + s: a microbatch that leaves the last stage
re-enters stage 0 m - p + 1 iterations later (circular schedule, v > 1), so m >= p, and stage 0
holds the returning microbatches in a delay line of m - p slots. m v + p - 1 iterations in all;
each stage idles p - 1 of them: the bubble (p - 1) / (m v + p - 1).

What crosses a stage boundary is the scheme's business (`Scheme.cross_stage`): by default the
whole stream state; Attention Residuals sends only the block summaries the receiving stage has not
seen (`AttnResCrossStage`), keeping the rest per microbatch on the stage. Every stage keeps each
microbatch's latest state (the `store`): the last stage's copy is the pipeline's output.

Block weights stay in block order, their `layers` axis split over `stage` in contiguous parts, so
checkpoints do not depend on the layout. With v = 1 (or a looped stack whose passes are the
repeats) a stage's pieces are its own rows and no weight moves; the circular schedule on a plain
stack needs each stage's strided pieces, which XLA gathers once per step (not per microbatch).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax.config import ConfigError, ModelConfig, PipelineConfig
from nagjax.model import loops
from nagjax.sharding import batch_shards, constrain, variable_axes


@dataclass(frozen=True)
class Schedule:
    """The numbers of one pipelined forward."""

    stages: int  # p
    repeats: int  # v: pieces per stage
    microbatches: int  # m
    positions: int  # E: executed block positions

    @property
    def pieces(self) -> int:
        return self.stages * self.repeats

    @property
    def per_piece(self) -> int:
        """k: executed positions per piece."""
        return self.positions // self.pieces

    @property
    def iterations(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    @property
    def delay(self) -> int:
        """Iterations a microbatch that left the last stage waits at stage 0 (circular schedule)."""
        return self.microbatches - self.stages if self.repeats > 1 else 0

    @property
    def bubble(self) -> float:
        """Fraction of stage-iterations that compute nothing: (p - 1) / (m v + p - 1)."""
        return (self.stages - 1) / self.iterations

    def describe(self) -> str:
        blocks = f"{self.per_piece} block{'s' if self.per_piece > 1 else ''}"
        repeats = f"{self.repeats} repeat{'s' if self.repeats > 1 else ''}"
        return (f"{self.stages} stages x {repeats} of {blocks}, {self.microbatches} microbatches: "
                f"{self.iterations} iterations, bubble {self.bubble:.1%}")


def schedule(cfg: ModelConfig, pipeline: PipelineConfig | None, stages: int) -> Schedule:
    """The schedule of `stages` stages; a ConfigError naming the key when the model cannot pipeline
    (the trainer and `nagjax compile` call it at start-up, the model at trace time)."""
    pipeline = pipeline or PipelineConfig()
    sched = Schedule(stages, pipeline.repeats, pipeline.microbatch_count(stages), cfg.executed_depth)
    if cfg.taper != "none":
        raise ConfigError(f"model.taper={cfg.taper} with mesh.stage={stages}: pipeline stages run one program "
                          "over weights of one shape, and a taper gives blocks different MLP widths; "
                          "set model.taper=none, or mesh.stage=1 (shard the tapered model with mesh.fsdp)")
    if sched.positions % sched.pieces:
        what = "model.depth" if cfg.repeat == 1 else f"the {sched.positions} executed blocks (model.repeat)"
        raise ConfigError(f"{what}={sched.positions} does not split into mesh.stage x pipeline.repeats = "
                          f"{stages} x {pipeline.repeats} pieces of equal length; choose mesh.stage and "
                          f"pipeline.repeats whose product divides {sched.positions}")
    if sched.microbatches < stages:
        raise ConfigError(f"pipeline.microbatches={sched.microbatches} must be >= mesh.stage={stages}")
    return sched


# ---------------------------------------------------------------------------------------------
# Weights: block order [E] -> [v, p, k] with the p axis on the stage devices
# ---------------------------------------------------------------------------------------------


def _constrain_pieces(variable, arranged):
    """Constrain an arranged [v, p, k, ...] leaf: p over `stage`, the rest as its parameter."""
    axes = variable_axes(variable, arranged.ndim - 2)
    return constrain(arranged, (None, "layers", None) + tuple(axes[1:]))


def arrange_stack(stack_params, cfg: ModelConfig, sched: Schedule):
    """A block stack's parameters [depth, ...] (an `nnx.State`) as [v, p, k, ...] per executed
    position: piece (r, s) at [r, s]. A plain stack is a reshape (v = 1: each stage's own rows); a
    looped stack in `cycle` order whose passes divide the repeats broadcasts each stage's own rows
    over the passes (its shared weights' gradient sums over them); other looped stacks gather."""
    v, p, k = sched.repeats, sched.stages, sched.per_piece
    rows = np.asarray(loops.executed_blocks(cfg))
    depth = cfg.depth
    whole_cycle = (cfg.repeat > 1 and np.array_equal(rows, np.tile(np.arange(depth), cfg.repeat))
                   and v % cfg.repeat == 0)

    def one(x, variable):
        rest = x.shape[1:]
        if cfg.repeat == 1:
            out = x.reshape((v, p, k) + rest)
        elif whole_cycle:
            c = v // cfg.repeat
            out = jnp.broadcast_to(x.reshape((1, c, p, k) + rest), (cfg.repeat, c, p, k) + rest)
            out = out.reshape((v, p, k) + rest)
        else:
            out = jnp.take(x, jnp.asarray(rows), axis=0).reshape((v, p, k) + rest)
        return _constrain_pieces(variable, out)

    return _map_variables(one, stack_params)


def arrange_positions(params, sched: Schedule):
    """Per-executed-position parameters [E, ...] (a looped stack's per-pass residuals) as [v, p, k, ...]."""
    v, p, k = sched.repeats, sched.stages, sched.per_piece
    return _map_variables(lambda x, var: _constrain_pieces(var, x.reshape((v, p, k) + x.shape[1:])), params)


def _map_variables(fn, state):
    """`fn(array, variable) -> array` over the variables of an `nnx.State`, keeping the variables
    (and their `logical_axes`), with the arrays replaced."""

    def one(node):
        if isinstance(node, nnx.Variable):
            return node.replace(fn(node[...], node))
        return node

    return jax.tree.map(one, state, is_leaf=lambda n: isinstance(n, nnx.Variable))


# ---------------------------------------------------------------------------------------------
# What crosses a stage boundary
# ---------------------------------------------------------------------------------------------


class WholeState:
    """The default cross-stage rule: the whole stream state crosses every hop."""

    def send(self, state, piece):
        """The message a stage sends after its piece: what piece `piece` needs from the sender."""
        del piece
        return state

    def receive(self, kept, message, piece):
        """The full state piece `piece` starts from: the stage's `kept` copy of this microbatch
        (its state after its previous piece, or zeros) merged with the `message`."""
        del kept, piece
        return message


# ---------------------------------------------------------------------------------------------
# The pipelined forward
# ---------------------------------------------------------------------------------------------


def split_microbatches(tree, m: int):
    """[B, ...] -> [m, B/m, ...], microbatch i = rows i, i+m, ...: each spans every batch shard."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1), tree)


def join_microbatches(tree):
    """The inverse of `split_microbatches`."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((-1,) + x.shape[2:]), tree)


def _stream_axes(x, lead: tuple) -> tuple:
    return lead + ("batch", "sequence") + ("act_embed",) * (x.ndim - len(lead) - 2)


def _constrain_staged(tree, lead=("stage",)):
    """Constrain [p, (extra lead dims,) mb, t, ...] leaves: p over `stage`, mb over the batch axes."""
    return jax.tree.map(lambda x: constrain(x, _stream_axes(x, lead)) if x.ndim >= len(lead) + 2 else x, tree)


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - pred.ndim)), x, y), a, b)


def run(sched: Schedule, state, positions_bt, piece_fn, cross, piece_inputs):
    """The pipelined forward of the stream `state` ([B, ...] leaves) through every piece.

    `piece_fn(state, inputs, repeat, piece, positions_bt) -> (state, ys)` runs one piece (k
    positions, ys [k, ...]) on one microbatch; `inputs` is the stage's part of `piece_inputs`
    (leaves [v, p, k, ...] -> [v, k, ...]: weights, per-pass residuals, thresholds), of which the
    piece reads row `repeat`, and `piece` is its index q = r p + s. The stage's part is the same in
    every iteration: a piece that reads its block's row inside its rematerialised block keeps
    nothing of the weights per iteration for the backward pass.
    `cross` is the scheme's cross-stage rule (`WholeState`). Returns (final state [B, ...],
    ys [E, ...] averaged over microbatches, as `train.grad_accum` averages its microbatches).
    """
    p, v, m = sched.stages, sched.repeats, sched.microbatches
    rows = jax.tree.leaves(state)[0].shape[0]
    if rows % (m * batch_shards()):
        # (an uneven split also makes XLA's partitioner drop gradient contributions: never run it)
        raise ValueError(f"pipeline: {rows} sequences do not split into pipeline.microbatches={m} "
                         f"microbatches that divide over the {batch_shards()} batch-parallel devices")
    micro = split_microbatches(state, m)
    positions = split_microbatches(positions_bt, m)
    stage_ids = jnp.arange(p, dtype=jnp.int32)

    def fresh(t):
        """Microbatch t's message into piece 0 (replicated over stages: stage 0 takes it)."""
        entering = jax.tree.map(lambda x: x[jnp.minimum(t, m - 1)], micro)
        return cross.send(entering, jnp.int32(0))

    def per_stage(stage, message, kept_all, totals, inputs, microbatch, repeat, valid):
        """One stage, one iteration (vmapped over the stages): receive, run its piece, keep the
        result for this microbatch (when the iteration is not a bubble) and send it on."""
        piece = repeat * p + stage
        kept = jax.tree.map(lambda x: x[microbatch], kept_all)
        start = cross.receive(kept, message, piece)
        out, ys = piece_fn(start, inputs, repeat, piece, jax.tree.map(lambda x: x[microbatch], positions))
        kept_all = jax.tree.map(lambda a, new, old: a.at[microbatch].set(jnp.where(valid, new, old)),
                                kept_all, out, kept)
        totals = jax.tree.map(lambda tot, y: tot.at[repeat].add(jnp.where(valid, y.astype(jnp.float32), 0.0)),
                              totals, ys)
        return cross.send(out, piece + 1), kept_all, totals

    staged = jax.vmap(per_stage, in_axes=(0, 0, 0, 0, 1, 0, 0, 0), spmd_axis_name="stage")

    ring = jax.tree.map(lambda x: jnp.broadcast_to(x, (p,) + x.shape), fresh(jnp.int32(0)))
    kept = jax.tree.map(lambda x: jnp.zeros((p, m) + x.shape[1:], x.dtype), micro)
    _, ys_shape = jax.eval_shape(lambda: jax.vmap(piece_fn, in_axes=(None, 1, None, None, None))(
        jax.tree.map(lambda x: x[0], micro), piece_inputs, jnp.int32(0), jnp.int32(0),
        jax.tree.map(lambda x: x[0], positions)))
    carry = {"ring": _constrain_staged(ring), "kept": _constrain_staged(kept, ("stage", None)),
             "totals": jax.tree.map(lambda s: jnp.zeros((s.shape[0], v) + s.shape[1:], jnp.float32), ys_shape)}
    if sched.delay:  # stage 0's delay line (every stage has one: a stage-sharded array is uniform)
        carry["delay"] = _constrain_staged(
            jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (p, sched.delay) + x.shape[1:]), ring),
            ("stage", None))

    def iteration(carry, t):
        offset = t - stage_ids  # stage s holds microbatch (t - s) mod m in its repeat (t - s) // m
        microbatch, repeat = offset % m, jnp.clip(offset // m, 0, v - 1)
        valid = (offset >= 0) & (offset < v * m)
        returning = carry["ring"]  # at stage 0: the last stage's message of the last iteration ...
        new = dict(carry)
        if sched.delay:  # ... which waits there `delay` iterations before it re-enters
            slot = t % sched.delay
            returning = jax.tree.map(lambda d: d[:, slot], carry["delay"])
            new["delay"] = jax.tree.map(lambda d, r: d.at[:, slot].set(r), carry["delay"], carry["ring"])
        entering = jax.tree.map(lambda f, r: jnp.where(t < m, f[None], r), fresh(t), returning)
        message = _select(stage_ids == 0, entering, carry["ring"])
        sent, kept, totals = staged(stage_ids, message, carry["kept"], carry["totals"], piece_inputs,
                                    microbatch, repeat, valid)
        new["kept"] = _constrain_staged(kept, ("stage", None))
        new["totals"] = totals
        new["ring"] = _constrain_staged(jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), sent))
        return new, None

    carry, _ = jax.lax.scan(iteration, carry, jnp.arange(sched.iterations, dtype=jnp.int32))
    # the last stage's copy, as a sum over the stage axis of the copies masked to it (a reduction
    # XLA partitions; indexing the stage-sharded axis gathered every stage's copy first)
    last = stage_ids == p - 1
    final = join_microbatches(jax.tree.map(
        lambda x: jnp.sum(jnp.where(last.reshape((p,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype)), axis=0),
        carry["kept"]))
    ys = jax.tree.map(lambda tot, s: (tot.swapaxes(0, 1).reshape((sched.positions,) + tot.shape[3:]) / m)
                      .astype(s.dtype), carry["totals"], ys_shape)
    return final, ys
