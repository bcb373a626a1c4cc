"""Per-block parameters of a trained model as numpy, in block order (taper stages flattened), and
per executed block of a looped stack (`model.repeat`): block b's shared weights once per pass,
with that pass's own residual parameters where the scheme has them per pass."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from nagjax.config import ModelConfig
from nagjax.model.loops import executed_blocks
from nagjax.model.transformer import block_stacks_of


def numpy_tree(params) -> dict:
    """A parameter state (nnx.State or nested dict of arrays) as a nested dict of float32 numpy."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    return jax.tree.map(lambda x: np.asarray(x, np.float32), pure)


def per_block(cfg: ModelConfig, params: dict) -> list[dict]:
    """One nested dict per block (the stacked `blocks` or taper `stages` sliced on axis 0)."""
    out = []
    for stack, n in block_stacks_of(cfg, params):
        out += [jax.tree.map(lambda x, k=k: x[k], stack) for k in range(n)]
    return out


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": {"b": x}} -> {"a.b": x} (list-like int keys become path parts too)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: np.array(v, order="C")})
    return out


def per_executed(cfg: ModelConfig, params: dict) -> list[dict]:
    """One nested dict per executed block (= `per_block` without repetition): a looped stack's
    block b at every position that runs it, its `residual` the position's own (`pass_residuals`)
    when the scheme's residual is per pass."""
    blocks = per_block(cfg, params)
    out = []
    for position, b in enumerate(executed_blocks(cfg)):
        layer = dict(blocks[b])
        if "pass_residuals" in params:
            layer["residual"] = jax.tree.map(lambda x, p=position: x[p], params["pass_residuals"])
        out.append(layer)
    return out
