"""Orbax checkpoints of everything a run needs to continue exactly.

One checkpoint = model parameters, optimiser state and step (`state`), the data iterator's state
(`data`) and the resolved config (`config`), written together by one `CheckpointManager.save`.
Orbax writes into a temporary directory and renames it only after every item is complete, and the
manager lists only committed steps, so a crash mid-write never yields a checkpoint that is later
restored; stale temporaries are removed on the next start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the directory and what to do."""


class CheckpointStore:
    def __init__(self, directory: str | Path, *, keep: int = 2, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,
        )
        if read_only and not self.directory.is_dir():
            raise CheckpointError(
                f"no checkpoints at {self.directory}: train first with "
                f"`nagjax train --workdir {self.directory.parent}`"
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore_config(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self._restore(step, config=ocp.args.JsonRestore())["config"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data-iterator state, config dict) of `step` (default: the latest)."""
        step = self._step(step)
        out = self._restore(
            step,
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        return out["state"], out["data"], out["config"]

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        return step

    def _restore(self, step: int, **items) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for damaged files
            path = self.directory / str(step)
            raise CheckpointError(
                f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e}). "
                f"Delete {path} to fall back to the previous checkpoint, or start a fresh --workdir."
            ) from e

    def close(self) -> None:
        self.manager.close()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: a reader (a resumed run, a restarted
    sweep) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """Shape/dtype skeleton of a pytree placed on `shardings` (one sharding, or a matching tree):
    the restore target for Orbax, which then reads each array straight onto its devices."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
