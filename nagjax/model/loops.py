"""Parameter-shared repetition (docs/methods.md §9): the executed sequence of a looped stack.

`model.repeat = R` runs the blocks of the repeated group (`model.repeat_blocks`, the whole stack by
default) R times with shared attention/MLP weights, in `model.repeat_order`:

    cycle   0..L-1, 0..L-1, ...           (the stack R times over; Relaxed Recursive Transformers)
    block   0,0,..., 1,1,..., ...         (each block R times in a row; MobileLLM's order)

Blocks before and after the group run once. `executed(cfg)` is the one static list of
(executed position p, block index b, pass k) that the transformer (which block's weights position p
gathers), the FLOP counter (one block's work per executed position), Mixture-of-Depths
(thresholds, statistics and skip rates per executed position: [executed_depth, 2]), the KV cache
(one per executed position), the depth microscope and export all read. With R = 1 it is
(i, i, 0) for every block, and the model is the plain stack.

The scheme's per-pass parameters (`Scheme.per_pass`) are one set per executed position unless
`model.repeat_share_residual`; the index a block hands its residual scheme (LNS factor, AttnRes
source slots) is the executed position.
"""

from __future__ import annotations

from typing import NamedTuple

from nagjax.config import ConfigError, ModelConfig
from nagjax.model import taper


class Executed(NamedTuple):
    position: int  # 0-based position in the executed sequence
    block: int  # the block (row of the stacked weights) it runs
    pass_: int  # which pass over that block (0 = first)


def executed(cfg: ModelConfig) -> tuple[Executed, ...]:
    """The executed sequence: (position, block, pass) per executed block, in execution order."""
    start, stop = cfg.repeat_group
    group = list(range(start, stop))
    if cfg.repeat_order == "cycle":
        looped = [(b, k) for k in range(cfg.repeat) for b in group]
    else:
        looped = [(b, k) for b in group for k in range(cfg.repeat)]
    seq = [(b, 0) for b in range(start)] + looped + [(b, 0) for b in range(stop, cfg.depth)]
    return tuple(Executed(p, b, k) for p, (b, k) in enumerate(seq))


def executed_blocks(cfg: ModelConfig) -> list[int]:
    """Block index of each executed position."""
    return [e.block for e in executed(cfg)]


def is_looped(cfg: ModelConfig) -> bool:
    return cfg.repeat > 1


def per_pass_residual(cfg: ModelConfig, per_pass: bool) -> bool:
    """Whether the block residual is one module per executed position (`per_pass`: the scheme's
    registry entry) rather than one per block, shared by its passes."""
    return is_looped(cfg) and per_pass and not cfg.repeat_share_residual


def check(cfg: ModelConfig) -> None:
    """Start-up checks that need the model floor: a taper must give the repeated group one width."""
    if not is_looped(cfg) or cfg.taper == "none":
        return
    start, stop = cfg.repeat_group
    widths = taper.block_widths(cfg)[start:stop]
    if len(set(widths)) > 1:
        raise ConfigError(f"model.repeat_blocks: the repeated blocks {start}:{stop} have different MLP widths "
                          f"{widths} under model.taper={cfg.taper}; repeat a group of equal widths")


def labels(cfg: ModelConfig) -> list[str]:
    """A label per executed position: the block index, plus `.k` (pass k) on a looped stack."""
    if not is_looped(cfg):
        return [str(i) for i in cfg.block_index_list]
    return [f"{e.block}.{e.pass_}" for e in executed(cfg)]


def describe(cfg: ModelConfig) -> str:
    """`4 blocks` or `2 blocks x 2 passes (cycle) = 4 executed`: the stack in words."""
    if not is_looped(cfg):
        return f"{cfg.depth} blocks"
    start, stop = cfg.repeat_group
    group = "" if (start, stop) == (0, cfg.depth) else f" of blocks {start}:{stop}"
    shared = ", shared residual" if cfg.repeat_share_residual else ""
    return (f"{cfg.depth} blocks, x{cfg.repeat} passes{group} ({cfg.repeat_order} order{shared}) = "
            f"{cfg.executed_depth} executed")
