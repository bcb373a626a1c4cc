"""Ahead-of-time compile of the train step for a target topology, without that hardware.

`nagjax compile --experiment NAME --topology TOPO` builds the abstract training state (nothing is
allocated), places it on a mesh over the target's devices with the same logical-axis rules as
training, lowers and compiles one train step, and prints the per-device memory XLA assigned, the
bytes the step moves around its layer loop, the collectives it runs (`nagjax/analysis/hlo.py`) and
the sharding of every parameter. TPU topologies (e.g. `v5p-64` or `v5p:2x4x4`) come from
`jax.experimental.topologies`, which needs libtpu (`pip install 'nagjax[tpu]'`; it installs and runs
on a CPU-only machine). `local` (or `gpu`, `cpu`) compiles for this machine's own devices.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax import sharding
from nagjax.analysis import hlo
from nagjax.config import Config, ConfigError
from nagjax.model import build_model
from nagjax.model import pipeline as pipelining
from nagjax.model.layers import compute_dtype_name
from nagjax.model.loops import describe as describe_stack
from nagjax.train.state import training_state

# Cloud TPU slice names (cores for v4/v5p, chips for v5e/v6e) -> jax topology names.
TPU_ALIASES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}
LOCAL = ("local", "gpu", "cpu")
GIB = 1024**3


class TopologyError(ConfigError):
    """The requested topology cannot be described by this jax build; the message says what can."""


@dataclasses.dataclass
class Target:
    name: str
    devices: list
    platform: str  # "tpu", "gpu" or "cpu"
    description: str


def _local_summary() -> str:
    devices = jax.devices()
    return f"local ({len(devices)} x {devices[0].device_kind}, platform {devices[0].platform})"


def available() -> str:
    return (f"{_local_summary()}; TPU slices by name ({', '.join(TPU_ALIASES)}) or as "
            "'<gen>:<AxBxC>' (e.g. v5p:2x4x4) when libtpu is installed")


def resolve_target(topology: str) -> Target:
    name = topology.strip()
    if name.lower() in LOCAL:
        devices = jax.devices()
        platform = devices[0].platform
        if name.lower() in ("gpu", "cpu") and platform != name.lower():
            raise TopologyError(
                f"--topology {name}: this machine's devices are {platform} ({devices[0].device_kind}); "
                f"GPU targets compile for the local GPUs only. Available here: {available()}"
            )
        return Target(name, devices, platform, f"{len(devices)} x {devices[0].device_kind} (local)")
    topo_name = TPU_ALIASES.get(name.lower(), name)
    if ":" not in topo_name:
        raise TopologyError(f"unknown topology {name!r}. Available: {available()}")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topo_name, platform="tpu")
    except Exception as e:  # RuntimeError without libtpu, XlaRuntimeError for a bad name
        hint = ("TPU topologies need libtpu: `pip install 'nagjax[tpu]'` (it pins the libtpu this jax reads; "
                "a newer libtpu compiles but its programs cannot be read back), which works on a CPU-only machine"
                if "not installed" in str(e) or "libtpu" in str(e).lower() else "check the name")
        raise TopologyError(
            f"this jax build ({jax.__version__}) cannot describe TPU topology {topo_name!r}: "
            f"{str(e).splitlines()[0][:200]}. {hint}. Available: {available()}"
        ) from None
    devices = list(desc.devices)
    return Target(name, devices, "tpu",
                  f"TPU {topo_name}, {len(devices)} x {devices[0].device_kind}")


def target_config(config: Config, platform: str) -> Config:
    """Fill what training resolves from the tokeniser or the local backend, for the target."""
    model = config.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=config.data.vocab_size)
    model = dataclasses.replace(model, compute_dtype=compute_dtype_name(model, platform))
    return config.replace(model=model).validate()


def _abstract_training(cfg: Config):
    """(steps, init_state) exactly as the trainer builds them (shapes only)."""
    spec = training_state(cfg)
    return spec.steps, spec.init


def _stream_bytes_per_token(model_cfg) -> int:
    """Bytes of the residual scheme's stream state per token (what remat=full saves per block)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))
    token = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    state = jax.eval_shape(lambda p, t: nnx.merge(graphdef, p).encode(t), params, token)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def _gib(n: float) -> str:
    return f"{n / GIB:9.3f} GiB"


def compile_report(config: Config, topology: str) -> str:
    target = resolve_target(topology)
    cfg = target_config(config, target.platform)
    mesh = sharding.make_mesh(cfg.mesh, target.devices)
    stages = cfg.mesh.stage
    schedule = pipelining.schedule(cfg.model, cfg.pipeline, stages) if stages > 1 else None
    batch_ways = sharding.check_batch_split(mesh, cfg.data.batch_size, cfg.train.grad_accum,
                                            cfg.pipeline.microbatch_count(stages))
    steps, init_state = _abstract_training(cfg)
    abstract = jax.eval_shape(init_state)
    shardings = sharding.state_shardings(mesh, abstract)
    sharded = sharding.shard_steps(steps, mesh, shardings)
    state_in = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    bsh = sharding.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32, sharding=bsh)
    batch = {"inputs": tokens, "targets": tokens}

    if target.platform == "tpu" and not any(d.platform == "tpu" for d in jax.local_devices()):
        # A program compiled for a described topology cannot be read back from the persistent
        # cache without that hardware (JAX warns on every later run): do not write it there.
        jax.config.update("jax_enable_compilation_cache", False)
    t0 = time.perf_counter()
    compiled = sharded.train.lower(state_in, batch, 0).compile()
    seconds = time.perf_counter() - t0

    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    params_b = sharding.per_device_bytes(abstract["params"], shardings["params"])
    opt_b = sharding.per_device_bytes(abstract["opt_state"], shardings["opt_state"])
    other_b = sum(sharding.per_device_bytes(abstract[k], shardings[k]) for k in abstract
                  if k not in ("params", "opt_state"))
    batch_b = 2 * math.prod(bsh.shard_shape(tokens.shape)) * 4
    m = cfg.model
    lines = [
        f"nagjax compile: {cfg.name} for {target.name} ({target.description})",
        f"mesh: {', '.join(f'{k}={v}' for k, v in mesh.shape.items())}",
        "pipeline: " + ("none (mesh.stage=1)" if schedule is None else schedule.describe()),
        f"model: {m.residual}, {describe_stack(m)}, d_model={m.d_model}, {m.n_heads} heads, "
        f"d_ff={m.mlp_width}, vocab={m.vocab_size}, {n_params / 1e9:.3f}B parameters; "
        f"compute {m.compute_dtype}, remat={m.remat}",
        f"batch: {cfg.data.batch_size} x {cfg.data.seq_len} tokens "
        f"({cfg.data.batch_size // batch_ways} sequences per data shard)",
        f"lowered and compiled one train step in {seconds:.1f} s",
        "",
        "per-device memory:",
        f"  parameters (float32)        {_gib(params_b)}",
        f"  optimiser state (AdamW)     {_gib(opt_b)}",
    ]
    if other_b:
        lines.append(f"  other state (accumulators)  {_gib(other_b)}")
    lines.append(f"  batch (inputs + targets)    {_gib(batch_b)}")
    mem = compiled.memory_analysis()
    if mem is not None:
        temp = mem.temp_size_in_bytes
        lines.append(f"  activations + temporaries   {_gib(temp)}   (XLA temp buffers)")
        if m.remat == "full":
            b_local = cfg.data.batch_size // batch_ways // cfg.train.grad_accum
            saved = m.executed_depth * b_local * cfg.data.seq_len * _stream_bytes_per_token(m)
            if schedule is not None:  # a stage's blocks, for every iteration (bubbles included)
                saved = saved // stages * schedule.iterations // (schedule.microbatches * schedule.repeats)
            lines.append(f"    of which saved block inputs (remat=full, estimate) {_gib(saved)}")
        unaliased_out = max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
        total = mem.argument_size_in_bytes + temp + unaliased_out + mem.generated_code_size_in_bytes
        lines += [
            f"  generated code              {_gib(mem.generated_code_size_in_bytes)}",
            f"  total (XLA: arguments {mem.argument_size_in_bytes / GIB:.3f} + temporaries "
            f"+ non-donated outputs {unaliased_out / GIB:.3f} + code) {_gib(total)}",
        ]
        limit = _device_memory(target)
        if limit:
            verdict = "fits" if total < limit else "DOES NOT FIT"
            lines.append(f"  device memory {_gib(limit)}: {verdict}")
    else:
        lines.append("  (this backend reports no memory analysis for compiled programs)")
    lines += ["", "data movement around the layer loop (optimised HLO; model.remat and model.scan_unroll change it):"]
    try:
        optimised = compiled.as_text()
    except jax.errors.JaxRuntimeError as error:  # e.g. a libtpu newer than this jaxlib reads back
        lines.append(f"  unavailable: the compiled program's text could not be read ({str(error).splitlines()[0]}); "
                     "install the libtpu your jax pins: pip install 'nagjax[tpu]'")
    else:
        lines += ["  " + hlo.format_movement(hlo.data_movement(optimised)),
                  "  " + hlo.format_collectives(hlo.collectives(optimised))]
    lines += ["", "parameter shardings (path, shape, logical axes, mesh axes, per-device shape):"]
    rows = sharding.sharding_table(abstract["params"], mesh)
    width = max(len(r[0]) for r in rows)
    for name, shape, axes, spec in rows:
        local = sharding.NamedSharding(mesh, sharding.logical_to_spec(shape, axes, mesh)).shard_shape(shape)
        lines.append(f"  {name:<{width}}  {str(shape):<22} {','.join(axes) or '-':<34} {spec:<20} {local}")
    return "\n".join(lines)


def _device_memory(target: Target) -> int | None:
    try:
        stats = target.devices[0].memory_stats()
    except Exception:  # topology devices and CPUs have none
        return None
    return (stats or {}).get("bytes_limit")
