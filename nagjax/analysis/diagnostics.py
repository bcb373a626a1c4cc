"""The depth microscope: per-layer quantities of a trained checkpoint.

`load_run(workdir, step)` restores a checkpoint (parameters, optimiser state, accumulators) on one
device. `microscope(run, batches)` runs the model block by block (a Python loop over the stacked
blocks, jit-compiled once) through the residual-scheme interface and measures, per sublayer:

  stream_rms      RMS of the residual stream after the sublayer (NAG: exp of the norm lane;
                  AttnRes: the sum of all sources, i.e. the Pre-LN-equivalent stream)
  update_ratio    ||R_after - R_before|| / ||R_before|| (mean over tokens)
  cosine          cos(R_before, R_after)
  nag_alpha, nag_gate, nag_gain   NAG alpha, mean modulator m and realised gain g = alpha * m
  mix_weights     AttnRes depth-mixing weights per buffer slot (mean over tokens)

and per block: block influence 1 - cos(h_in, h_out), angular distance arccos(cos) / pi, weight
magnitude, the accumulated gradient norm (CascadeFlow score, `aux["block_grad_norm_sum"]`) and the
validation loss when the block is skipped. Skipping = the block is never run (its residual update
is the identity; AttnRes: its outputs are never written), which is exactly what `nagjax prune`
computes with the block removed. Mixture-of-Depths is not applied here (dense forward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nagjax.config import Config, config_from_dict
from nagjax.model import StepContext
from nagjax.model.residual.base import ATTENTION, MLP
from nagjax.train.checkpoint import CheckpointStore, abstract_like


@dataclass
class Run:
    workdir: Path
    step: int
    config: Config
    graphdef: nnx.GraphDef
    state: dict  # {"params", "opt_state", "aux"}

    @property
    def params(self):
        return self.state["params"]

    def model(self):
        return nnx.merge(self.graphdef, self.params)


def checkpoint_steps(workdir: str | Path) -> list[int]:
    store = CheckpointStore(Path(workdir).absolute() / "checkpoints", read_only=True)
    try:
        return sorted(store.all_steps())
    finally:
        store.close()


def abstract_state(config: Config):
    """(graphdef, shape/dtype tree of {params, opt_state, aux}, init function) of a config,
    exactly as the trainer builds them."""
    from nagjax.train.state import training_state

    spec = training_state(config)
    return spec.graphdef, spec.abstract, spec.init


def load_run(workdir: str | Path, step: int | None = None) -> Run:
    """Restore checkpoint `step` (default: the latest) of `workdir` onto the first device."""
    workdir = Path(workdir).absolute()
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    try:
        steps = store.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {store.directory}")
        step = max(steps) if step is None else step
        config = config_from_dict(store.restore_config(step))
        graphdef, abstract, _ = abstract_state(config)
        target = abstract_like(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        state, data_state, _ = store.restore(target, step)
    finally:
        store.close()
    run = Run(workdir, step, config, graphdef, state)
    run.data_state = data_state
    return run


def validation_batches(config: Config, n_batches: int) -> list[dict[str, np.ndarray]]:
    from nagjax.data import pipeline

    return pipeline.eval_batches(config.data, n_batches)


# ---------------------------------------------------------------------------------------------
# Block-by-block forward
# ---------------------------------------------------------------------------------------------


def stream_vector(residual: str, state: dict):
    """The residual stream R [b, t, d] float32 of a scheme's state."""
    if residual == "nag":
        return jnp.exp(state["log_norm"])[..., None] * state["direction"].astype(jnp.float32)
    if residual == "attnres":
        return jnp.sum(state["sources"], axis=2)
    return state["x"].astype(jnp.float32)


def _row_cos(a, b):
    num = jnp.sum(a * b, -1)
    return num / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-30)


def block_list(model) -> list[tuple[nnx.Module, int]]:
    """(block module, original block index) in stack order, unstacked from the scanned stacks."""
    ids = model.cfg.block_index_list
    out = []
    for start, stack in model.block_stacks():
        graphdef, state = nnx.split(stack)
        n = jax.tree.leaves(state)[0].shape[0]
        for r in range(n):
            out.append((nnx.merge(graphdef, jax.tree.map(lambda x, r=r: x[r], state)), ids[start + r]))
    return out


def trace(model, tokens_bt, keep=None):
    """Run `model` block by block. `keep` [depth] (0/1, may be traced) skips blocks.

    Returns (logits, per-sublayer dict of [depth, 2, ...] arrays, per-block dict of [depth])."""
    cfg = model.cfg
    ctx = StepContext()
    positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    table = model.stream.embedding_table(model.embed[...])
    from nagjax.model.layers import compute_dtype

    state = model.stream.encode(jnp.take(table, tokens_bt, axis=0).astype(compute_dtype(cfg)))
    sub: dict[str, list] = {}
    blk: dict[str, list] = {"block_cosine": []}
    for pos, (block, block_id) in enumerate(block_list(model)):
        block_in = stream_vector(cfg.residual, state)
        before_block = state
        rows: dict[str, list] = {}
        for slot in (ATTENTION, MLP):
            fn = block.attn if slot == ATTENTION else (lambda x, _p, _m=block.mlp, **_kv: _m(x))
            r_before = stream_vector(cfg.residual, state)
            if cfg.residual == "attnres":
                rows.setdefault("mix_weights", []).append(
                    jnp.mean(block.residual.routers[slot].weights(state), axis=(0, 1)))
            state, stats = block.residual(state, fn, positions, slot, jnp.int32(block_id), ctx)
            r_after = stream_vector(cfg.residual, state)
            rms = jnp.sqrt(jnp.mean(r_after * r_after, -1))
            delta = jnp.linalg.norm(r_after - r_before, axis=-1) / (jnp.linalg.norm(r_before, axis=-1) + 1e-30)
            rows.setdefault("stream_rms", []).append(jnp.mean(rms))
            rows.setdefault("update_ratio", []).append(jnp.mean(delta))
            rows.setdefault("cosine", []).append(jnp.mean(_row_cos(r_before, r_after)))
            if cfg.residual == "nag":
                rows.setdefault("nag_alpha", []).append(stats["alpha"])
                rows.setdefault("nag_gate", []).append(stats["gate_mean"])
                rows.setdefault("nag_gain", []).append(stats["update_ratio"])
        if keep is not None:
            state = jax.tree.map(lambda new, old: jnp.where(keep[pos] > 0, new, old), state, before_block)
        for k, v in rows.items():
            sub.setdefault(k, []).append(jnp.stack(v))
        blk["block_cosine"].append(jnp.mean(_row_cos(block_in, stream_vector(cfg.residual, state))))
    logits = model.stream.logits(state, model.head_table()).astype(jnp.float32)
    return logits, {k: jnp.stack(v) for k, v in sub.items()}, {k: jnp.stack(v) for k, v in blk.items()}


def _loss(logits, targets):
    import optax

    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


@functools.lru_cache(maxsize=8)
def _traced_fn(graphdef):
    def fn(params, inputs, targets, keep):
        logits, sub, blk = trace(nnx.merge(graphdef, params), inputs, keep)
        return _loss(logits, targets), sub, blk

    return jax.jit(fn)


def evaluate(run: Run, batches, keep=None) -> tuple[float, dict, dict]:
    """(mean loss, mean per-sublayer stats, mean per-block stats) over `batches`."""
    depth = run.config.model.depth
    keep = jnp.ones((depth,), jnp.float32) if keep is None else jnp.asarray(keep, jnp.float32)
    fn = _traced_fn(run.graphdef)
    losses, subs, blks = [], [], []
    for b in batches:
        loss, sub, blk = fn(run.params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]), keep)
        losses.append(float(loss))
        subs.append(jax.device_get(sub))
        blks.append(jax.device_get(blk))
    mean = lambda items: {k: np.mean([np.asarray(x[k]) for x in items], axis=0) for k in items[0]}
    return float(np.mean(losses)), mean(subs), mean(blks)


def weight_magnitude(run: Run) -> np.ndarray:
    """RMS of each block's parameters [depth] (the 'weight magnitude' pruning baseline)."""
    out = []
    for block, _ in block_list(run.model()):
        leaves = jax.tree.leaves(nnx.state(block, nnx.Param))
        sq = sum(float(jnp.sum(jnp.square(x))) for x in leaves)
        n = sum(x.size for x in leaves)
        out.append(math.sqrt(sq / n))
    return np.asarray(out)


def microscope(run: Run, batches, *, skip_losses: bool = True) -> dict:
    """Every per-layer quantity of the module docstring, as plain lists (JSON-ready)."""
    cfg = run.config.model
    loss, sub, blk = evaluate(run, batches)
    cos = np.clip(blk["block_cosine"], -1.0, 1.0)
    out = {
        "workdir": str(run.workdir),
        "name": run.config.name,
        "residual": cfg.residual,
        "taper": cfg.taper,
        "depth": cfg.depth,
        "step": run.step,
        "block_ids": cfg.block_index_list,
        "loss": loss,
        "sublayers": {k: np.asarray(v).tolist() for k, v in sub.items()},  # [depth, 2, ...]
        "blocks": {
            "block_influence": (1.0 - cos).tolist(),
            "angular_distance": (np.arccos(cos) / np.pi).tolist(),
            "weight_magnitude": weight_magnitude(run).tolist(),
            "grad_norm_sum": np.asarray(run.state["aux"]["block_grad_norm_sum"]).tolist(),
        },
    }
    if skip_losses:
        skipped = []
        for i in range(cfg.depth):
            keep = np.ones(cfg.depth)
            keep[i] = 0
            skipped.append(evaluate(run, batches, keep)[0])
        out["blocks"]["skip_loss"] = skipped
        out["blocks"]["skip_loss_increase"] = (np.asarray(skipped) - loss).tolist()
    return out
