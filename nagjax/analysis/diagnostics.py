"""The depth microscope: per-layer quantities of a trained checkpoint.

`load_run(workdir, step)` restores a checkpoint (parameters, optimiser state, accumulators) on one
device. `microscope(run, batches)` runs the model's own scanned block forward (dense: no
Mixture-of-Depths skipping) with an observer on every sublayer and measures, per sublayer:

  stream_rms      RMS of the residual stream after the sublayer (the scheme's `residual_vector`:
                  NAG exp(norm lane) x direction, AttnRes the sum of all sources, i.e. the
                  Pre-LN-equivalent stream)
  update_ratio    ||R_after - R_before|| / ||R_before|| (mean over tokens)
  cosine          cos(R_before, R_after)
  ...             the scheme's own quantities (`Scheme.microscope`: NAG alpha, mean modulator m
                  and realised gain g = alpha * m; AttnRes depth-mixing weights per buffer slot)

and per block: block influence 1 - cos(h_in, h_out), angular distance arccos(cos) / pi, weight
magnitude, the accumulated gradient norm (CascadeFlow score, `aux["block_grad_norm_sum"]`) and the
validation loss when the block is skipped. Skipping = the block's output is discarded (its
residual update is the identity; AttnRes: its outputs are never written), which is exactly what
`nagjax prune` computes with the block removed.
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
from nagjax.data import pipeline
from nagjax.model import StepContext
from nagjax.model import mod as modlib
from nagjax.model.residual import get_scheme
from nagjax.model.transformer import block_stacks_of
from nagjax.train.checkpoint import CheckpointStore, abstract_like
from nagjax.train.loss import cross_entropy
from nagjax.train.state import restore_state, training_state


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
        state, data_state = restore_state(store, target, step)
    finally:
        store.close()
    run = Run(workdir, step, config, graphdef, state)
    run.data_state = data_state
    return run


def validation_batches(config: Config, n_batches: int) -> list[dict[str, np.ndarray]]:
    return pipeline.eval_batches(config.data, n_batches)


# ---------------------------------------------------------------------------------------------
# The block forward, observed
# ---------------------------------------------------------------------------------------------


def _row_cos(a, b):
    num = jnp.sum(a * b, -1)
    return num / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-30)


def trace(model, tokens_bt, keep=None):
    """Run `model` densely, observing every sublayer. `keep` [depth] (0/1, may be traced) skips
    blocks: a skipped block's output is discarded.

    Returns (logits, per-sublayer dict of [depth, 2, ...] arrays, per-block dict of [depth])."""
    vector = model.stream.residual_vector
    own = get_scheme(model.cfg.residual).microscope
    keep = jnp.ones((model.cfg.depth,), jnp.float32) if keep is None else jnp.asarray(keep, jnp.float32)

    def observed_block(block, state, positions, block_index, ctx, keep_block):
        rows: dict[str, list] = {}

        def observe(slot, before, after, stats):
            r_before, r_after = vector(before), vector(after)
            rms = jnp.sqrt(jnp.mean(r_after * r_after, -1))
            delta = jnp.linalg.norm(r_after - r_before, axis=-1) / (jnp.linalg.norm(r_before, axis=-1) + 1e-30)
            rows.setdefault("stream_rms", []).append(jnp.mean(rms))
            rows.setdefault("update_ratio", []).append(jnp.mean(delta))
            rows.setdefault("cosine", []).append(jnp.mean(_row_cos(r_before, r_after)))
            for name, own_stat in own.items():
                rows.setdefault(name, []).append(stats[own_stat.stat])

        new, _ = block(state, positions, block_index, ctx, observe=observe)
        new = jax.tree.map(lambda a, b: jnp.where(keep_block > 0, a, b), new, state)
        block_cosine = jnp.mean(_row_cos(vector(state), vector(new)))
        return new, ({k: jnp.stack(v) for k, v in rows.items()}, block_cosine)

    ctx = StepContext(routing=modlib.DENSE)
    state, (sub, cos) = model.run_blocks(model.encode(tokens_bt), None, ctx, call=observed_block, per_block=keep)
    return model.logits(state), sub, {"block_cosine": cos}


def _loss(logits, targets):
    return jnp.mean(cross_entropy(logits, targets))


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
    for stack, n in block_stacks_of(run.config.model, run.params):
        leaves = [np.asarray(x, np.float64).reshape(n, -1) for x in jax.tree.leaves(stack)]
        sq = sum(np.sum(np.square(x), axis=1) for x in leaves)
        out += [math.sqrt(v / sum(x.shape[1] for x in leaves)) for v in sq]
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
