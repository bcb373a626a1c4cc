"""Device mesh from the config and placement of parameters and batches.

Today parameters are replicated and the batch is split over the (data, fsdp) axes; the logical-axis
rules that shard parameters (FSDP, tensor parallelism) plug in at `param_sharding`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nagjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: fixed axes multiply to {known}, which does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n_devices} devices "
            "(set one axis to -1 to take the rest)"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # jit-inferred shardings, as pjit did
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh, params):
    """Sharding of every parameter (replicated for now)."""
    return jax.tree.map(lambda _: replicated(mesh), params)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }
