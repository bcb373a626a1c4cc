"""The residual-scheme interface and registry: the only place schemes differ.

A scheme is one registry entry (`Scheme`) that owns everything scheme-specific:

  * `stream(cfg, rngs=)`: one module per model that turns token embeddings into the initial stream
    state and the final state into logits, and owns the embedding-side/head-side parameters;
  * `block_residual(cfg, block_index, rngs=)`: one module per Transformer block (stacked and scanned
    with the block) that, given the stream state, the token positions and one sublayer as a
    function `f(x_btd, positions_bt, kv=None)`, returns the new state and per-sublayer statistics;
  * the row work it adds per token (for the FLOP counter), its optimiser parameter groups (by
    parameter *type*: a `nnx.Param` subclass), the sharding rules of its own logical axis names,
    the statistics the depth microscope plots, and whether it gives Mixture-of-Depths a skip signal.

The state is a dict of [b, t, ...] arrays (a pytree, so it can be the carry of `lax.scan`). Adding
a scheme means one file defining its modules and its `Scheme`, and one `register(...)` line in
`residual/__init__.py` (or in your own code): the transformer, trainer, optimiser, FLOP counter,
sharding and analysis read the registry and never compare scheme names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import jax
from flax import nnx

from nagjax.config import (ModelConfig, OptimConfig, SchemeDeclaration, SchemeOptions, declare_scheme,
                           scheme_declaration, undeclare_scheme)
from nagjax.model.layers import ATTENTION, MLP, KVSource  # noqa: F401  (re-exported)
from nagjax.sharding import register_logical_axes, unregister_logical_axes

if TYPE_CHECKING:
    from nagjax.model.mod import Routing

State = dict[str, jax.Array]
# sublayer(x_btd, positions_bt, kv=None) -> f_btd (see nagjax/model/layers.py)
Sublayer = Callable[..., jax.Array]


@dataclass(frozen=True)
class StepContext:
    """Per-call values that are not parameters (traced values are fine)."""

    step: Any = None  # the training step inside a train step (e.g. for warm-ups); None elsewhere
    # Mixture-of-Depths for this call (a `Routing` from the model's `MoDPolicy`, nagjax/model/mod/);
    # None: the policy's training routing (top-k at its configured rate, dense without one).
    routing: Routing | None = None


class Stream(Protocol):
    def embedding_table(self, raw_vd: jax.Array) -> jax.Array: ...

    def encode(self, embeddings_btd: jax.Array) -> State: ...

    def logits(self, state: State, head_vd: jax.Array) -> jax.Array: ...

    def head_inputs(self, state: State) -> State:
        """The part of the final state the head reads ([b, t, ...] leaves; `logits` accepts it):
        what a chunked loss slices, so it should be small (nagjax/train/loss.py)."""
        ...

    def residual_vector(self, state: State) -> jax.Array:
        """The residual stream R [b, t, d] in float32 that the state represents (the microscope's
        stream RMS, update size and cosine are measured on it)."""
        ...


class BlockResidual(Protocol):
    def __call__(self, state: State, sublayer: Sublayer, positions_bt: jax.Array, slot: int,
                 block_index: jax.Array, ctx: StepContext) -> tuple[State, dict[str, jax.Array]]: ...


@dataclass(frozen=True)
class ParamGroup:
    """An optimiser group: every parameter of type `param_type` (a `nnx.Param` subclass) trains
    with the matrix learning rate times `lr_scale(optim_config)`, with or without weight decay.
    Parameters of no scheme group are `matrix` (>= 2 logical axes, decayed) or `vector`."""

    name: str
    param_type: type[nnx.Param]
    lr_scale: Callable[[OptimConfig], float] = lambda optim: 1.0
    weight_decay: bool = False


def _no_flops(cfg: ModelConfig) -> float:
    return 0.0


@dataclass(frozen=True)
class MicroscopeStat:
    """A per-sublayer statistic of a scheme that the depth microscope records and plots
    (`nagjax analyze`): `stat` names the entry of the block residual's stats, `title` the plot's."""

    stat: str
    title: str
    log: bool = False  # log-scale y axis
    heatmap: bool = False  # the stat is a vector per sublayer: drawn as a sublayer x entry heat map


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    stream: Callable[..., Stream]  # (cfg, *, rngs) -> Stream
    block_residual: Callable[..., BlockResidual]  # (cfg, block_index, *, rngs) -> BlockResidual
    # Per-token row work around one sublayer (norms, adds, NAG's update and modulator) when a
    # fraction `executed` of the tokens run it (Mixture-of-Depths), in FLOPs per token.
    sublayer_row_flops: Callable[[ModelConfig, float], float]
    final_row_flops: Callable[[ModelConfig], float] = _no_flops  # once per token before the head
    param_groups: tuple[ParamGroup, ...] = ()
    logical_axes: Mapping[str, Any] = field(default_factory=dict)  # name -> mesh axes (sharding.py)
    microscope: Mapping[str, MicroscopeStat] = field(default_factory=dict)  # recorded name -> stat
    # The block residual computes a per-token skip signal before the sublayer runs and makes a
    # skipped sublayer an exact identity, so Mixture-of-Depths can route on it (docs/methods.md §2).
    skip_signal: bool = False
    # The scheme's own hyperparameters: a frozen `SchemeOptions` dataclass defined beside the
    # scheme, the config group `model.<name>` (read as `cfg.<name>`); None: no options.
    options: type[SchemeOptions] | None = None
    # Parameter-shared repetition (`model.repeat > 1`, nagjax/model/loops.py): whether the block
    # residual's parameters are per executed pass (one set per executed position, unless
    # `model.repeat_share_residual`) or belong to the block and are shared by its passes like its
    # attention and MLP weights. Index-derived behaviour (LNS's factor, AttnRes's source slots)
    # always follows the executed position.
    per_pass: bool = True
    # Pipeline parallelism (nagjax/model/pipeline.py): `cross_stage(cfg, schedule)` gives the rule
    # for what crosses a stage boundary (`send(state, piece)`, `receive(kept, message, piece)`, as
    # `pipeline.WholeState`); None: the whole state crosses every hop.
    cross_stage: Callable[..., Any] | None = None


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry (`model.residual=<name>` then selects it, `model.<name>.*` sets
    its options); its logical axis names join the sharding rules."""
    existing = SCHEMES.get(scheme.name)
    if existing is not None and existing is not scheme:
        raise ValueError(f"residual scheme {scheme.name!r} is already registered")
    register_logical_axes(scheme.name, scheme.logical_axes)
    declare_scheme(SchemeDeclaration(scheme.name, options=scheme.options, skip_signal=scheme.skip_signal))
    SCHEMES[scheme.name] = scheme
    return scheme


def unregister(name: str) -> None:
    """Remove scheme `name` from the registry, the config declarations and the sharding rules."""
    SCHEMES.pop(name, None)
    undeclare_scheme(name)
    unregister_logical_axes(name)


def get_scheme(name: str) -> Scheme:
    """The registered scheme `name`; an unknown name is a ConfigError naming the choices."""
    scheme_declaration(name)  # the error names the registered schemes
    return SCHEMES[name]


def all_param_groups() -> list[ParamGroup]:
    return [g for scheme in SCHEMES.values() for g in scheme.param_groups]
