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

A looped stack (`model.repeat`, nagjax/model/loops.py) is observed per executed (block, pass):
sublayer quantities, block influence and skip losses are [executed depth] (skipping one pass of a
block), weight magnitude and gradient norm per block; `passes` summarises each pass (mean update
ratio over its blocks' sublayers and, for a run that trains with Mixture-of-Depths, the skip rate
under its trained thresholds), so a user sees which loops tokens actually use.
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
from nagjax.model import loops
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
    """Run `model` densely, observing every sublayer. `keep` [executed depth] (0/1, may be traced)
    skips executed blocks: a skipped block's output is discarded.

    Returns (logits, per-sublayer dict of [executed depth, 2, ...] arrays, per-executed-block dict
    of [executed depth]); the executed depth is the depth without repetition."""
    vector = model.stream.residual_vector
    own = get_scheme(model.cfg.residual).microscope
    keep = jnp.ones((model.cfg.executed_depth,), jnp.float32) if keep is None else jnp.asarray(keep, jnp.float32)

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
    depth = run.config.model.executed_depth
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


def trained_skip_rates(run: Run, batches) -> np.ndarray | None:
    """[executed depth, 2] skip rate under the run's trained thresholds (causal), or None when the
    run does not train with Mixture-of-Depths (the model's policy decides)."""
    model = run.model()
    routing = model.mod_policy.eval_routing(run.state["aux"])
    if not routing.skips:
        return None
    fn = jax.jit(lambda params, x: nnx.merge(run.graphdef, params)(x, ctx=StepContext(routing=routing))[1]["skip_rate"])
    return np.mean([np.asarray(fn(run.params, jnp.asarray(b["inputs"]))) for b in batches], axis=0)


def per_pass(cfg, sublayers: dict, skip_rate: np.ndarray | None) -> list[dict]:
    """Per pass k of a looped stack: its executed blocks and the mean update ratio (and skip rate)
    over their sublayers; one entry (pass 0, every block) without repetition."""
    seq = loops.executed(cfg)
    out = []
    for k in range(cfg.repeat):
        rows = [e.position for e in seq if e.pass_ == k]
        entry = {"pass": k, "positions": rows,
                 "update_ratio": float(np.mean(np.asarray(sublayers["update_ratio"])[rows]))}
        if skip_rate is not None:
            entry["skip_rate"] = float(np.mean(skip_rate[rows]))
            entry["skip_rate_attention"] = float(np.mean(skip_rate[rows, 0]))
            entry["skip_rate_mlp"] = float(np.mean(skip_rate[rows, 1]))
        out.append(entry)
    return out


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
        # executed blocks (= the blocks without repetition): index, block, pass, "block.pass" label
        "repeat": cfg.repeat,
        "positions": cfg.executed_index_list,
        "executed_blocks": loops.executed_blocks(cfg),
        "executed_labels": loops.labels(cfg),
        "loss": loss,
        "sublayers": {k: np.asarray(v).tolist() for k, v in sub.items()},  # [executed depth, 2, ...]
        "blocks": {
            "block_influence": (1.0 - cos).tolist(),
            "angular_distance": (np.arccos(cos) / np.pi).tolist(),
            "weight_magnitude": weight_magnitude(run).tolist(),
            "grad_norm_sum": np.asarray(run.state["aux"]["block_grad_norm_sum"]).tolist(),
        },
    }
    skip_rate = trained_skip_rates(run, batches)
    if skip_rate is not None:
        out["sublayers"]["skip_rate"] = skip_rate.tolist()
    out["passes"] = per_pass(cfg, out["sublayers"], skip_rate)
    if skip_losses:
        skipped = []
        for i in range(cfg.executed_depth):
            keep = np.ones(cfg.executed_depth)
            keep[i] = 0
            skipped.append(evaluate(run, batches, keep)[0])
        out["blocks"]["skip_loss"] = skipped
        out["blocks"]["skip_loss_increase"] = (np.asarray(skipped) - loss).tolist()
    return out
