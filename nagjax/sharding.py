"""Device meshes, logical-axis sharding rules, and placement of state and batches.

The mesh has five named axes, outermost first:

  dcn     data parallelism across slices / hosts over the data-centre network (`mesh.dcn_data`)
  stage   pipeline stages: the stacked blocks' `layers` axis is split over it, and microbatches
          hop from stage to stage (`mesh.stage`, nagjax/model/pipeline.py); outermost inside a
          slice, so on a multi-host GPU run consecutive stages are consecutive hosts
  data    data parallelism inside a slice (replicated parameters)
  fsdp    data parallelism that also shards parameters and optimiser state (ZeRO-3 / FSDP)
  tensor  tensor parallelism: attention heads and MLP width are split across it

Every parameter carries `logical_axes` metadata (layers.py); parameters stacked by `nnx.vmap` get a
leading "layers" axis. One table maps logical names to mesh axes: `LOGICAL_RULES` for the shared
decoder, extended by each residual scheme's own names (`Scheme.logical_axes`, e.g. NAG's
`sublayer` and `modulator`); `logical_rules()` is the merged table. The sharding of every array in
the training state (parameters, Adam moments, anything else replicated) and the key activations
follows from it, so a new parameter needs nothing here unless it brings a new logical name (an
unknown name is an error, never a silent replication). A dimension that does not divide by
its mesh axes is replicated along that dimension (the golden tables in tests/golden/ record it).

All mesh axes are `AxisType.Auto` (jax >= 0.10 defaults `jax.make_mesh` to Explicit): shardings are
given at the jit boundary and XLA's SPMD partitioner propagates them, as `pjit` did.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from nagjax.config import ConfigError, MeshConfig

MESH_AXES = ("dcn", "stage", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp")

# logical axis name -> mesh axes (a name, a tuple of names, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": BATCH_AXES,
    "sequence": None,
    "act_embed": None,  # the residual stream is replicated across `tensor` (Megatron style)
    "stage": "stage",  # the pipeline's per-stage buffers (nagjax/model/pipeline.py)
    # parameters
    "layers": "stage",  # the stacked block axis: each pipeline stage holds its blocks (all, without stages)
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}


# Logical axis names that a residual scheme brings (`Scheme.logical_axes`), by the scheme that
# registered them: the scheme registry adds them here (`register_logical_axes`).
_SCHEME_AXES: dict[str, dict[str, str | tuple[str, ...] | None]] = {}


def register_logical_axes(owner: str, rules: Mapping[str, str | tuple[str, ...] | None]) -> None:
    """Add `owner`'s logical axis names to the rules; a shared name, or a name another owner maps
    differently, is an error."""
    shared = set(rules) & set(LOGICAL_RULES)
    if shared:
        raise ValueError(f"scheme {owner!r} redefines the shared logical axes {sorted(shared)}")
    for other, other_rules in _SCHEME_AXES.items():
        for axis, rule in rules.items():
            if other != owner and axis in other_rules and other_rules[axis] != rule:
                raise ValueError(f"scheme {owner!r} maps logical axis {axis!r} to {rule!r}, "
                                 f"but {other!r} maps it to {other_rules[axis]!r}")
    _SCHEME_AXES[owner] = dict(rules)


def unregister_logical_axes(owner: str) -> None:
    _SCHEME_AXES.pop(owner, None)


def logical_rules() -> dict[str, str | tuple[str, ...] | None]:
    """`LOGICAL_RULES` plus the logical axis names of every registered residual scheme."""
    scheme_axes = {axis: rule for rules in _SCHEME_AXES.values() for axis, rule in rules.items()}
    return {**scheme_axes, **LOGICAL_RULES}


# ---------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int, int, int]:
    """(dcn, stage, data, fsdp, tensor) sizes for `n_devices`, solving the one -1 axis."""
    dcn, stage = cfg.dcn_data, cfg.stage
    if n_devices % dcn:
        raise ConfigError(f"mesh.dcn_data={dcn} does not divide the {n_devices} devices")
    if (n_devices // dcn) % stage:
        raise ConfigError(f"mesh.stage={stage} does not divide the {n_devices // dcn} devices"
                          + (f" per slice (mesh.dcn_data={dcn})" if dcn > 1 else ""))
    per_slice = n_devices // dcn // stage
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ConfigError(
                f"mesh: fixed axes multiply to {known}, which does not divide {per_slice} devices"
                + (f" per stage ({n_devices} devices / mesh.dcn_data={dcn} / mesh.stage={stage})"
                   if dcn * stage > 1 else "")
            )
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"mesh: dcn_data*stage*data*fsdp*tensor = {dcn * stage * math.prod(sizes)} but there are "
            f"{n_devices} devices (set one of mesh.data/fsdp/tensor to -1 to take the rest)"
        )
    return (dcn, stage, *sizes)


def _auto(n: int) -> tuple:
    return (jax.sharding.AxisType.Auto,) * n


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """The (dcn, stage, data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    With mesh.dcn_data > 1 the devices are grouped into that many granules (TPU slices, or hosts
    when the devices have no slice index) and only the `dcn` axis crosses granules.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if shape[0] == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=_auto(5), devices=devices)
    from jax.experimental import mesh_utils

    by_slice = getattr(devices[0], "slice_index", None) is not None
    array = mesh_utils.create_hybrid_device_mesh(
        (1, *shape[1:]), (shape[0], 1, 1, 1, 1), devices, process_is_granule=not by_slice
    )
    return jax.sharding.Mesh(array, MESH_AXES, axis_types=_auto(5))


def axis_sizes(mesh) -> dict[str, int]:
    """Mesh axis sizes of a `Mesh`, an `AbstractMesh`, or a plain {name: size} dict."""
    return dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)


# ---------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ---------------------------------------------------------------------------------------------


def logical_to_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh,
                    rules: Mapping | None = None) -> P:
    """PartitionSpec of an array of `shape` whose dimensions have `logical_axes`.

    Mesh axes absent from `mesh` or of size 1 are dropped; a dimension keeps the longest prefix of
    its mesh axes whose product divides it; a mesh axis is used at most once per array.
    """
    rules = logical_rules() if rules is None else rules
    sizes = axis_sizes(mesh)
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims but logical axes {logical_axes}")
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; add it to nagjax.sharding.LOGICAL_RULES "
                f"or to its residual scheme's `logical_axes` (known: {', '.join(sorted(rules))})"
            )
        target = rules[name]
        target = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        chosen: list[str] = []
        for axis in target:
            size = sizes.get(axis, 1)
            if size == 1 or axis in used:
                continue
            if dim % (math.prod(sizes[a] for a in chosen) * size):
                break
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def variable_axes(variable: nnx.Variable, ndim: int) -> tuple:
    """Logical axes of a parameter's array: its `logical_axes`, plus a leading "layers" axis when
    the array has one more dimension (stacked by `nnx.vmap` over the blocks)."""
    axes = tuple(getattr(variable, "logical_axes", None) or ())
    if ndim == len(axes) + 1:
        return ("layers", *axes)
    if ndim != len(axes):
        raise ValueError(f"array of rank {ndim} but logical_axes {axes}")
    return axes


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_specs(tree: Any, mesh, rules: Mapping | None = None) -> Any:
    """A PartitionSpec for every array leaf of `tree` (same structure): leaves inside an
    `nnx.Variable` with `logical_axes` (parameters, and optimiser moments, which optax builds with
    the same Variable wrappers) follow the rules; every other leaf (step counts, accumulators) is
    replicated."""
    rules = logical_rules() if rules is None else rules
    nodes, _ = jax.tree_util.tree_flatten(tree, is_leaf=_is_variable)
    specs = []
    for node in nodes:
        if _is_variable(node):
            for leaf in jax.tree.leaves(node):
                axes = variable_axes(node, len(leaf.shape))
                specs.append(logical_to_spec(leaf.shape, axes, mesh, rules))
        else:
            specs.append(P())
    return jax.tree.unflatten(jax.tree.structure(tree), specs)


def state_shardings(mesh: jax.sharding.Mesh, tree: Any, rules: Mapping | None = None) -> Any:
    """NamedSharding of every array in `tree` (abstract or concrete state: params, opt state, ...)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh, rules))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharding_table(params: Any, mesh) -> list[tuple[str, tuple, tuple, str]]:
    """(path, shape, logical axes, spec) per parameter, sorted by path: the golden-table rows."""
    rows = []
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
    for path, node in flat:
        if not _is_variable(node):
            continue
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for leaf in jax.tree.leaves(node):
            axes = variable_axes(node, len(leaf.shape))
            spec = logical_to_spec(leaf.shape, axes, mesh)
            rows.append((name, tuple(leaf.shape), axes, format_spec(spec, len(leaf.shape))))
    return sorted(rows)


def format_spec(spec: P, ndim: int) -> str:
    """`(-, fsdp, tensor+data)`: one entry per dimension; "-" = not split. Scalars: `()`."""
    def one(s):
        if s is None:
            return "-"
        return "+".join(s) if isinstance(s, tuple) else s

    entries = list(spec) + [None] * (ndim - len(spec))
    return "(" + ", ".join(one(s) for s in entries) + ")"


# ---------------------------------------------------------------------------------------------
# Batches and activations
# ---------------------------------------------------------------------------------------------


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_part(mesh, batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds part `index` of `count` equal, contiguous row blocks of
    every global batch (what the data pipeline reads for it). Without pipeline stages across
    processes that is (process index, process count); processes that hold different stages of
    the same batch rows feed the same part."""
    rows = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = sorted({(idx[0].start or 0, idx[0].stop or batch_size) for idx in rows.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if hi - lo != sum(b - a for a, b in starts) or batch_size % (hi - lo):
        raise ConfigError(f"mesh {axis_sizes(mesh)}: this process's devices hold rows {starts} of the batch, "
                          "not one contiguous block; order the mesh so each process holds whole batch shards")
    return lo // (hi - lo), batch_size // (hi - lo)


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the batch axes.

    The process holds its part (`batch_part`) of the global batch: the batch is that many times
    its rows. jax places the rows on its devices, so no process ever sees rows it does not hold.
    """
    sharding = batch_sharding(mesh)
    parts = batch_part(mesh, math.prod(axis_sizes(mesh).get(a, 1) for a in BATCH_AXES))[1]
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * parts,) + v.shape[1:])
    return out


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of the arrays `tree` (shapes) placed with `shardings`."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def check_batch_split(mesh, batch_size: int, grad_accum: int = 1, pipeline_microbatches: int = 1) -> int:
    """The batch's ways over the mesh's batch axes; a ConfigError unless every microbatch
    (batch_size / grad_accum sequences, and that / pipeline_microbatches on a pipelined mesh)
    splits evenly over them (else XLA would gather each microbatch onto every device and repeat
    its work there)."""
    ways = math.prod(axis_sizes(mesh).get(a, 1) for a in BATCH_AXES)
    if batch_size % ways:
        raise ConfigError(f"data.batch_size={batch_size} must divide by the batch axes dcn*data*fsdp = "
                          f"{ways} of mesh {axis_sizes(mesh)}")
    if (batch_size // grad_accum) % ways:
        raise ConfigError(f"train.grad_accum={grad_accum}: a microbatch of {batch_size // grad_accum} sequences "
                          f"does not split over the {ways} batch-parallel devices; choose grad_accum so that "
                          f"data.batch_size / grad_accum is a multiple of {ways}")
    if axis_sizes(mesh).get("stage", 1) > 1 and (batch_size // grad_accum // pipeline_microbatches) % ways:
        raise ConfigError(f"pipeline.microbatches={pipeline_microbatches}: a pipeline microbatch of "
                          f"{batch_size // grad_accum // pipeline_microbatches} sequences does not split over "
                          f"the {ways} batch-parallel devices; make data.batch_size / (train.grad_accum * "
                          f"pipeline.microbatches) a multiple of {ways}")
    return ways


def gather_from_processes(values: Sequence[int]) -> np.ndarray:
    """Every process's `values` (small ints), one row per process in process order: how hosts
    share what each of them found before one decision that all of them take. A collective: every
    process must call it, in the same order. One process: its own row, no communication."""
    row = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return row[None]
    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)


def stage_count() -> int:
    """Pipeline stages of the mesh in context (1 outside a mesh or without a `stage` axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get("stage", 1)


def batch_shards(*, over_stages: bool = False) -> int:
    """Ways the batch is split on the mesh in context (1 outside a mesh); `over_stages`: as
    `constrain_stream(..., over_stages=True)` splits it after a pipeline."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = BATCH_AXES + (("stage",) if over_stages else ())
    return 1 if mesh.empty else math.prod(dict(mesh.shape).get(a, 1) for a in axes)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Mapping | None = None) -> jax.Array:
    """`with_sharding_constraint` by logical axis names (under `rules`, default `logical_rules()`)
    against the mesh in context (set by `jax.set_mesh`, which the sharded steps do); a no-op
    outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(x.shape, logical_axes, mesh, rules))


def constrain_stream(state: Any, *, over_stages: bool = False) -> Any:
    """Constrain every array of a residual-stream state ([b, t, ...]) to batch sharding, replicated
    over the feature axes. Called at the block boundary of the layer scan. `over_stages`: the rows
    are split over the pipeline stages too (the head and the loss after a pipeline, which would
    otherwise run once per stage on the same rows); never inside the pipeline's stage vmap."""
    rules = {**logical_rules(), "batch": BATCH_AXES + ("stage",)} if over_stages and stage_count() > 1 else None

    def one(x):
        if x.ndim < 2:
            return x
        return constrain(x, ("batch", "sequence") + ("act_embed",) * (x.ndim - 2), rules)

    return jax.tree.map(one, state)


# ---------------------------------------------------------------------------------------------
# Sharded steps
# ---------------------------------------------------------------------------------------------


class _UnderMesh:
    """A jitted function called (and lowered) inside `jax.set_mesh(mesh)`, so that activation
    constraints resolve against the mesh at trace time."""

    def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh):
        self.jitted, self.mesh = jitted, mesh
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def shard_steps(steps, mesh: jax.sharding.Mesh, shardings: Any):
    """The `train.step.Steps` with their shardings pinned: the state keeps `shardings` (so donation
    reuses buffers and no step recompiles), batches are split over the batch axes, metrics
    replicated; both run under the mesh."""
    batch, repl = batch_sharding(mesh), replicated(mesh)
    train = jax.jit(steps.train, in_shardings=(shardings, batch, repl),
                    out_shardings=(shardings, repl), donate_argnums=(0,))
    eval_ = jax.jit(steps.eval, in_shardings=(shardings["params"], shardings["aux"], batch), out_shardings=repl)
    losses = jax.jit(steps.eval_losses, in_shardings=(shardings["params"], shardings["aux"], batch),
                     out_shardings=batch)
    return dataclasses.replace(steps, train=_UnderMesh(train, mesh), eval=_UnderMesh(eval_, mesh),
                               eval_losses=_UnderMesh(losses, mesh))


def map_over_batch(fn: Callable, row_args: Sequence[jax.Array], replicated_args: Sequence[Any]):
    """`fn(*row_args, *replicated_args)` run per batch shard under `jax.shard_map` when a mesh is in
    context, else called directly.

    For kernels XLA cannot partition (a Pallas call is an opaque custom call: the partitioner would
    gather its inputs onto every device). Row arguments and every output are [b, ...] arrays split
    over the batch axes; replicated arguments (parameters) are whole on every shard, and their
    gradients are summed over the shards by shard_map's transpose.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*row_args, *replicated_args)
    rows = logical_to_spec(row_args[0].shape[:1], ("batch",), mesh)
    if rows == P(None) or rows == P():
        return fn(*row_args, *replicated_args)
    specs = (P(*rows),) * len(row_args) + (P(),) * len(replicated_args)
    # check_vma=False: a Pallas call declares no per-axis variance of its outputs.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(*rows), check_vma=False)(
        *row_args, *replicated_args)
