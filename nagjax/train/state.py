"""The training state of a config, built one way for the trainer, `nagjax compile` and analysis.

State = {"params", "opt_state", "aux"}. `training_state(config)` gives the model graph, the
optimiser and jit-compilable train/eval steps, an `init` function (run it under `jax.jit` with
output shardings) and the abstract state (shapes and dtypes only: the restore target for Orbax
and the input of the sharding rules). Nothing is allocated here. `restore_state` reads a
checkpoint back into that shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import optax
from flax import nnx

from nagjax.config import Config
from nagjax.model import build_model
from nagjax.model.mod import MoDPolicy
from nagjax.train import optim
from nagjax.train.checkpoint import CheckpointError, CheckpointStore
from nagjax.train.guard import init_guard
from nagjax.train.step import Steps, init_aux, make_steps


@dataclass
class TrainingState:
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    lr_fn: optax.Schedule
    steps: Steps
    init: Callable[[], dict]
    abstract: Any  # jax.ShapeDtypeStruct tree of {"params", "opt_state", "aux"}
    n_params: int


def training_state(config: Config) -> TrainingState:
    cfg = config
    mod_policy = MoDPolicy.of(cfg.model, cfg.mod)  # one policy for the model and its steps

    def model():
        return build_model(cfg.model, seed=cfg.train.seed, policy=mod_policy, pipeline=cfg.pipeline)

    graphdef, abstract_params = nnx.split(nnx.eval_shape(model), nnx.Param)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps, abstract_params)
    lr_fn = optim.schedule(cfg.optim, cfg.train.steps)
    steps = make_steps(graphdef, cfg.model, optimizer, lr_fn, policy=mod_policy, train=cfg.train)

    def init() -> dict:
        params = nnx.split(model(), nnx.Param)[1]
        return {"params": params, "opt_state": optimizer.init(params), "aux": init_aux(cfg.model)}

    n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
    return TrainingState(graphdef, optimizer, lr_fn, steps, init, jax.eval_shape(init), n_params)


def restore_state(store: CheckpointStore, abstract: Any, step: int) -> tuple[dict, dict]:
    """(state, data-iterator state) of checkpoint `step`, restored into `abstract` (shapes with
    shardings, `checkpoint.abstract_like`). A checkpoint written before the bad-step counters
    existed (no `aux.guard`) gets fresh ones, so runs started by an older nagjax still resume."""
    try:
        state, data_state, _ = store.restore(abstract, step)
        return state, data_state
    except CheckpointError as error:
        older = {**abstract, "aux": {k: v for k, v in abstract["aux"].items() if k != "guard"}}
        try:
            state, data_state, _ = store.restore(older, step)
        except CheckpointError:
            raise error from error.__cause__
    shardings = jax.tree.map(lambda a: a.sharding, abstract["aux"]["guard"])
    guard = jax.jit(init_guard, out_shardings=shardings)()
    return {**state, "aux": {**state["aux"], "guard": guard}}, data_state
