"""Run by tests/test_pipeline.py in a subprocess with 8 forced CPU devices: the loss and gradients of
one train batch on pipelined meshes against one device, and the collectives of compiled steps.

    python tests/pipeline_child.py CASE [CASE ...]   (a case of CASES, or "all")

prints one JSON object {case: {...}} with the measured differences and collective census."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import TINY_RUN
from nagjax import sharding
from nagjax.analysis import hlo
from nagjax.config import MeshConfig, apply_overrides
from nagjax.model import pipeline
from nagjax.model.mod import MoDPolicy
from nagjax.registry import get_experiment, load_experiments
from nagjax.train.state import training_state
from nagjax.train.step import train_loss

BATCH, SEQ = 16, 32
SCHEMES = {
    "prenorm": ["model.residual=prenorm"],
    "nag": ["model.residual=nag"],
    "nag_mod": ["model.residual=nag", "mod.rate=0.25"],  # exempt first block: dense and routed slots
    "attnres_block": ["model.residual=attnres", "model.attnres.block_size=2"],
    # the rest of the matrix (benchmarks/pipeline_equivalence.py)
    "lns": ["model.residual=lns"],
    "attnres_full": ["model.residual=attnres", "model.attnres.block_size=1"],
    "nag_kernel_remat": ["model.residual=nag", "model.nag.kernel=pallas", "mod.rate=0.25", "model.remat=full"],
    "nag_loop_mod": ["model.residual=nag", "model.repeat=2", "mod.rate=0.25", "model.remat=dots"],
}
# layout -> (mesh, pipeline overrides)
LAYOUTS = {
    "stage2": ({"stage": 2, "data": -1}, []),
    "stage4": ({"stage": 4, "data": -1}, []),
    "stage2_r2": ({"stage": 2, "data": -1}, ["pipeline.repeats=2"]),
    "stage4_r2": ({"stage": 4, "data": -1}, ["pipeline.repeats=2", "model.depth=8"]),
    # 4 microbatches on 2 stages: the circular schedule's delay line at stage 0
    "stage2_fsdp2_r2_m4": ({"stage": 2, "fsdp": 2, "data": -1}, ["pipeline.repeats=2", "pipeline.microbatches=4"]),
    "stage2_data2_tensor2": ({"stage": 2, "data": 2, "tensor": 2, "fsdp": 1}, ["pipeline.microbatches=4"]),
}
# the cases the default test run checks: every scheme, every layout feature, one compile each
DEFAULT = ("prenorm:stage4", "nag:stage2_fsdp2_r2_m4", "nag_mod:stage2_data2_tensor2",
           "attnres_block:stage2_r2")


def config(scheme: str, extra=()):
    return apply_overrides(get_experiment("quickstart"), [
        *TINY_RUN, f"data.batch_size={BATCH}", "model.depth=4", "model.vocab_size=4096",
        *SCHEMES[scheme], *extra])


def loss_and_grads_fn(cfg):
    """(training state spec, fn(params, batch) -> (loss, grads)): the one step every case compiles."""
    spec = training_state(cfg)
    policy = MoDPolicy.of(cfg.model, cfg.mod)
    routing = policy.train_routing(cfg.data.seq_len)

    def fn(params, batch):
        loss = lambda p: train_loss(spec.graphdef, p, batch, jnp.int32(5), routing)[0]
        return jax.value_and_grad(loss)(params)

    return spec, fn


def loss_and_grads(cfg, mesh_kw=None):
    """(loss, grads, compiled HLO) of one batch: on device 0, or on a mesh of the 8 devices."""
    spec, fn = loss_and_grads_fn(cfg)
    params = jax.jit(spec.init)()["params"]
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, cfg.model.vocab_size, (BATCH, SEQ)).astype(np.int32) for k in ("inputs", "targets")}
    if mesh_kw is None:
        (loss, grads) = jax.jit(fn)(params, batch)
        return loss, grads, None
    mesh = sharding.make_mesh(MeshConfig(**mesh_kw))
    shardings = sharding.state_shardings(mesh, params)
    jitted = jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(mesh)))
    params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        loss, grads = jitted(params, batch)
        text = jitted.lower(params, batch).compile().as_text()
    return loss, grads, text


def compare(scheme: str, layout: str) -> dict:
    mesh_kw, extra = LAYOUTS[layout]
    model_extra = [o for o in extra if o.startswith("model.")]
    cfg_ref = config(scheme, model_extra)
    cfg = config(scheme, extra)
    loss0, grads0, _ = loss_and_grads(cfg_ref)
    loss, grads, text = loss_and_grads(cfg, mesh_kw)
    sched = pipeline.schedule(cfg.model, cfg.pipeline, mesh_kw["stage"])
    return {
        "loss": float(loss0),
        "loss_diff": abs(float(loss) - float(loss0)),
        "grad_diff": max(float(jnp.max(jnp.abs(a - b)))
                         for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads))),
        "grad_scale": max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(grads0)),
        "iterations": sched.iterations,
        "collectives": hlo.collectives(text),
    }


def step_collectives(cfg) -> dict:
    """The collectives census of `cfg`'s loss-and-gradient step compiled (not run) on its mesh
    (`cfg.mesh` over the devices of this process); also benchmarks/pipeline_attnres_cache.py's."""
    spec, fn = loss_and_grads_fn(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    abstract = jax.eval_shape(spec.init)["params"]
    shardings = sharding.state_shardings(mesh, abstract)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(params, {"inputs": tokens, "targets": tokens}).compile().as_text()
    return hlo.collectives(text)


def main(cases: list[str]) -> dict:
    load_experiments()
    if cases == ["all"]:
        cases = [f"{s}:{lay}" for s in SCHEMES for lay in LAYOUTS]
    out = {}
    for case in cases:
        if case.startswith("census:"):  # census:<scheme>:<override>,<override>
            _, scheme, overrides = case.split(":", 2)
            out[case] = step_collectives(config(scheme, [o for o in overrides.split(",") if o]))
        else:
            out[case] = compare(*case.split(":"))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
