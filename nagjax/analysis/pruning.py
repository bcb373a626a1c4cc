"""CascadeFlow pruning (docs/methods.md §5) and its baselines; pruned checkpoints that train and eval accept.

Scores per block (the lowest-scoring blocks are removed first):
  cascadeflow      accumulated training gradient norm, `aux["block_grad_norm_sum"]` (recorded by
                   the trainer every step; no post-hoc analysis)
  block-influence  1 - cos(h_in, h_out) of the block on validation tokens
  angular          arccos(cos(h_in, h_out)) / pi
  magnitude        RMS of the block's parameters

`prune_workdir` writes a new workdir whose config has `model.depth` reduced, `model.block_ids`
set to the kept blocks' original indices (so index-dependent schemes, LNS and AttnRes, compute
exactly the model with those blocks removed) and, for a tapered model, `taper=custom` with the
kept widths. Its checkpoint holds the kept blocks' stacked parameters, the matching rows of the
optimiser moments and accumulators, and the data-iterator position, at the same step: `nagjax
eval` evaluates it and `nagjax train --workdir NEW --set train.steps=...` heals it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nagjax.analysis import diagnostics as diag
from nagjax.config import Config, ConfigError
from nagjax.model import taper
from nagjax.model.transformer import stack_paths
from nagjax.train.checkpoint import CheckpointStore
from nagjax.train.trainer import evaluate_workdir, train

METHODS = ("cascadeflow", "block-influence", "angular", "magnitude")


def scores(run: diag.Run, batches, methods=METHODS, micro: dict | None = None) -> dict[str, np.ndarray]:
    """Per-block score of each method (low = prune first)."""
    out = {}
    if "cascadeflow" in methods:
        out["cascadeflow"] = np.asarray(run.state["aux"]["block_grad_norm_sum"], np.float64)
    if any(m in methods for m in ("block-influence", "angular")):
        if micro is None:
            _, _, blk = diag.evaluate(run, batches)
            cos = np.clip(blk["block_cosine"], -1, 1)
            micro = {"blocks": {"block_influence": 1 - cos, "angular_distance": np.arccos(cos) / np.pi}}
        if "block-influence" in methods:
            out["block-influence"] = np.asarray(micro["blocks"]["block_influence"], np.float64)
        if "angular" in methods:
            out["angular"] = np.asarray(micro["blocks"]["angular_distance"], np.float64)
    if "magnitude" in methods:
        out["magnitude"] = diag.weight_magnitude(run)
    return out


def ranking(score: np.ndarray) -> list[int]:
    """Block positions, first to prune first (ties: the later block first)."""
    score = np.asarray(score)
    return sorted(range(len(score)), key=lambda i: (score[i], -i))


def spearman(a, b) -> float:
    """Spearman rank correlation of two score vectors (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties share their average rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------------------------
# Pruned checkpoints
# ---------------------------------------------------------------------------------------------


def pruned_config(config: Config, keep: list[int]) -> Config:
    m = config.model
    ids = m.block_index_list
    changes = dict(depth=len(keep), block_ids=",".join(str(ids[i]) for i in keep))
    if m.taper != "none":
        widths = taper.block_widths(m)
        changes.update(taper="custom", taper_widths=",".join(str(widths[i]) for i in keep))
    model = dataclasses.replace(m, **changes)
    return config.replace(model=model).validate()


def _key(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _locations(config: Config) -> list[tuple[tuple, int]]:
    """Per block position: the path of its stack and its row in that stack."""
    return [(path, row) for path, n in stack_paths(config.model) for row in range(n)]


def remap_blocks(new_abstract, old_tree, old_config: Config, new_config: Config, keep: list[int]):
    """A tree shaped like `new_abstract` filled from `old_tree`: block-stacked leaves (under a
    stack path of `transformer.stack_paths`, at any depth: parameters or optimiser moments) take
    the kept rows, everything else is copied."""
    old_flat = {tuple(_key(k) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(old_tree)[0]}
    old_loc, new_loc = _locations(old_config), _locations(new_config)
    new_starts = {}
    for pos, (prefix, _) in enumerate(new_loc):
        new_starts.setdefault(prefix, pos)

    def fill(path, leaf):
        keys = tuple(_key(k) for k in path)
        for i in range(len(keys)):
            for prefix, start in new_starts.items():
                if keys[i:i + len(prefix)] != prefix:
                    continue
                rest = keys[i + len(prefix):]
                rows = []
                for r in range(leaf.shape[0]):
                    old_prefix, old_row = old_loc[keep[start + r]]
                    rows.append(old_flat[keys[:i] + old_prefix + rest][old_row])
                return jnp.stack(rows).astype(leaf.dtype)
        return old_flat[keys]

    return jax.tree_util.tree_map_with_path(fill, new_abstract)


def prune_state(run: diag.Run, keep: list[int]) -> tuple[Config, dict]:
    new_config = pruned_config(run.config, keep)
    _, abstract, _ = diag.abstract_state(new_config)
    params = remap_blocks(abstract["params"], run.state["params"], run.config, new_config, keep)
    opt_state = remap_blocks(abstract["opt_state"], run.state["opt_state"], run.config, new_config, keep)
    depth = run.config.model.depth
    aux = jax.tree.map(
        lambda new, old: jnp.asarray(old)[np.asarray(keep)] if (np.ndim(old) >= 1 and old.shape[0] == depth
                                                               and new.shape[0] == len(keep)) else old,
        abstract["aux"], run.state["aux"])
    return new_config, {"params": params, "opt_state": opt_state, "aux": aux}


def prune_workdir(workdir: str | Path, n_blocks: int, method: str, *, out: str | Path | None = None,
                  heal_steps: int = 0, eval_batches: int | None = None) -> dict:
    """Remove the `n_blocks` lowest-scoring blocks; write, evaluate (and optionally heal) the result."""
    if method not in METHODS:
        raise ConfigError(f"--method: unknown {method!r}; expected one of {', '.join(METHODS)}")
    run = diag.load_run(workdir)
    depth = run.config.model.depth
    if not 1 <= n_blocks < depth:
        raise ConfigError(f"--blocks must be in [1, {depth - 1}] for a {depth}-block model (got {n_blocks})")
    batches = diag.validation_batches(run.config, eval_batches or run.config.train.eval_batches)
    score = scores(run, batches, (method,))[method]
    drop = sorted(ranking(score)[:n_blocks])
    keep = [i for i in range(depth) if i not in drop]
    new_config, state = prune_state(run, keep)
    out = Path(out or f"{Path(workdir).absolute()}-pruned-{n_blocks}-{method}").absolute()
    if (out / "checkpoints").exists() and CheckpointStore(out / "checkpoints", read_only=True).latest_step() is not None:
        raise ConfigError(f"{out} already holds a checkpoint; pass --out to choose another folder")
    store = CheckpointStore(out / "checkpoints", keep=new_config.train.keep_checkpoints)
    try:
        store.save(run.step, state, run.data_state, new_config.to_dict())
    finally:
        store.close()
    (out / "config.json").write_text(json.dumps(new_config.to_dict(), indent=2))
    before = evaluate_workdir(workdir, eval_batches)
    after = evaluate_workdir(out, eval_batches)
    report = {
        "source": str(Path(workdir).absolute()), "pruned": str(out), "method": method, "step": run.step,
        "scores": score.tolist(), "dropped_blocks": [run.config.model.block_index_list[i] for i in drop],
        "kept_blocks": new_config.model.block_index_list, "loss_before": before["loss"],
        "loss_after": after["loss"], "bpb_before": before["bpb"], "bpb_after": after["bpb"],
    }
    if heal_steps > 0:
        heal = new_config.replace(train=dataclasses.replace(new_config.train, steps=run.step + heal_steps))
        result = train(heal, out)
        report.update(heal_steps=heal_steps, loss_after_heal=result.val_loss, bpb_after_heal=result.val_bpb)
    (out / "prune_report.json").write_text(json.dumps(report, indent=2))
    return report


def prune_report(workdir: str | Path, eval_batches: int | None = None, steps: tuple[int, int] | None = None,
                 compare_workdir: str | Path | None = None) -> dict:
    """Each method's ranking, the loss after dropping each single block, and rank stability
    (Spearman) of each method between two checkpoints (default: the two latest of `workdir`, or the
    latest of `workdir` and of `compare_workdir`, e.g. another seed)."""
    all_steps = diag.checkpoint_steps(workdir)
    run = diag.load_run(workdir, steps[1] if steps else None)
    batches = diag.validation_batches(run.config, eval_batches or run.config.train.eval_batches)
    micro = diag.microscope(run, batches)
    now = scores(run, batches, micro=micro)
    skip = np.asarray(micro["blocks"]["skip_loss"])
    report = {
        "workdir": str(run.workdir), "step": run.step, "loss": micro["loss"],
        "skip_loss": skip.tolist(), "oracle_ranking": ranking(skip),
        "methods": {m: {"scores": s.tolist(), "ranking": ranking(s), "spearman_vs_skip_loss": spearman(s, skip)}
                    for m, s in now.items()},
    }
    other = None
    if compare_workdir is not None:
        other = diag.load_run(compare_workdir)
    elif steps:
        other = diag.load_run(workdir, steps[0])
    elif len(all_steps) >= 2:
        other = diag.load_run(workdir, [s for s in all_steps if s != run.step][-1])
    if other is not None:
        then = scores(other, batches)
        report["stability_against"] = {"workdir": str(other.workdir), "step": other.step}
        for m, s in then.items():
            report["methods"][m]["spearman_stability"] = spearman(s, now[m])
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['workdir']} step {report['step']}: validation loss {report['loss']:.4f}",
             "loss after dropping each single block: "
             + ", ".join(f"{i}:{v:.4f}" for i, v in enumerate(report["skip_loss"])),
             f"oracle order (least harmful first): {report['oracle_ranking']}"]
    against = report.get("stability_against")
    header = f"{'method':<16} {'prune order (first = least important)':<40} {'rho vs skip-loss':>16}"
    if against:
        header += f" {'stability rho':>14}"
    lines.append(header)
    for m, r in report["methods"].items():
        row = f"{m:<16} {str(r['ranking']):<40} {r['spearman_vs_skip_loss']:>16.3f}"
        if against:
            row += f" {r.get('spearman_stability', float('nan')):>14.3f}"
        lines.append(row)
    if against:
        lines.append(f"stability: Spearman between this checkpoint's scores and "
                     f"{against['workdir']} step {against['step']}")
    return "\n".join(lines)
