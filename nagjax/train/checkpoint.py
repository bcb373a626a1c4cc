"""Orbax checkpoints of everything a run needs to continue exactly.

One checkpoint = model parameters, optimiser state and step (`state`), the data iterator's state
(`data`) and the resolved config (`config`), written together by one `CheckpointManager.save`.
Orbax writes into a temporary directory and renames it only after every item is complete, and the
manager lists only committed steps, so a crash mid-write never yields a checkpoint that is later
restored; stale temporaries are removed on the next start.

The trainer saves asynchronously (`CheckpointStore(asynchronous=True)`; `train.async_checkpointing`,
on by default): `save` returns once the state is copied off the devices and training continues while a background thread
writes it; at most one save is in flight (a new save, a restore and `close` first wait for it).

Which checkpoint a run resumes from is one decision, `restore_agreed`, taken once for every
process: only damage to a checkpoint's own files (`CheckpointError.kind == "corrupt"`) passes it
over for an older one, which is then moved aside to `<step>.corrupt` (never deleted) and noted in
`CORRUPT.txt`; a storage error (permissions, I/O) is retried and then stops the run, moving nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nagjax import sharding


T = TypeVar("T")

# Seconds between the tries of a restore that failed with a storage error (then it stops the run).
RETRY_DELAYS = (1.0, 4.0, 15.0)
CORRUPT_NOTE = "CORRUPT.txt"

# tensorstore reports an error as a ValueError whose text starts with an absl status code. These
# say the bytes on disk are wrong: damaged (DATA_LOSS), cut short (OUT_OF_RANGE), missing from a
# committed checkpoint (NOT_FOUND) or unparsable (INVALID_ARGUMENT, FAILED_PRECONDITION).
# PERMISSION_DENIED, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, UNKNOWN ... are
# the storage's trouble, not the checkpoint's.
_CORRUPT_STATUS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
_TRANSIENT_STATUS = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                     "ABORTED", "CANCELLED", "UNKNOWN", "INTERNAL", "UNAUTHENTICATED")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the directory and what to do.

    `kind`: "corrupt" (the checkpoint's own files are damaged: a restore may fall back past it),
    "transient" (a storage error: worth retrying, never a reason to move anything) or "other" (it
    does not fit this state, or there is nothing to restore)."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


def error_kind(error: BaseException) -> str:
    """"corrupt", "transient" or "other" for an exception raised while restoring a checkpoint
    (its cause chain is read outermost first; the kinds Orbax and tensorstore raise for garbled,
    truncated and missing files were found by experiment, see tests/test_checkpoints.py)."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            return "corrupt"  # a garbled metadata or JSON item
        if isinstance(e, FileNotFoundError):
            return "corrupt"  # a file of a committed checkpoint is gone
        if isinstance(e, OSError):
            return "transient"  # permissions, I/O errors, stale handles, timeouts
        if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
            return "corrupt"  # a whole item directory is gone
        if isinstance(e, ValueError):
            code = str(e).split(":", 1)[0].strip()
            if code in _CORRUPT_STATUS:
                return "corrupt"
            if code in _TRANSIENT_STATUS:
                return "transient"
        e = e.__cause__ or e.__context__
    return "other"


class CheckpointStore:
    """`read_only=True` opens existing checkpoints for reading only: nothing is created, cleaned up
    or saved (the store refuses), with options Orbax does not warn about. `asynchronous=True`:
    `save` returns while the checkpoint is still being written (module docstring)."""

    def __init__(self, directory: str | Path, *, keep: int = 2, read_only: bool = False,
                 asynchronous: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self.asynchronous = asynchronous and not read_only
        # Orbax's own read_only=True logs a warning per option it overrides and one for the
        # directory; a manager that is never asked to save or delete needs none of them.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=self.asynchronous,
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
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Write checkpoint `step`; asynchronous stores return once the arrays are off the devices
        (`wait` for it to be committed). A save still in flight is finished first."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; not saving step {step}")
        self.manager.wait_until_finished()  # at most one save in flight
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )
        if not self.asynchronous:
            self.manager.wait_until_finished()

    def saving(self) -> bool:
        """Whether a save is still being written."""
        return self.manager.is_saving_in_progress()

    def wait(self) -> None:
        """Return once every save is committed (listed) or has raised its error."""
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

    def move_aside(self, step: int, cause: str) -> Path | None:
        """Rename checkpoint `step` to `<step>.corrupt` (kept for inspection, never listed,
        garbage-collected or overwritten) and note it in CORRUPT.txt; a collective (process 0
        renames). None, and nothing moved, for a read-only store."""
        if self.read_only:
            return None
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt-{n}"
        if jax.process_index() == 0:  # one writer on a shared filesystem
            source.rename(target)
            with open(self.directory / CORRUPT_NOTE, "a") as note:
                note.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  step {step} moved to {target.name}: {cause}\n")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"nagjax checkpoint {step} moved aside")
        self.manager.reload()
        return target

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
        self.manager.wait_until_finished()  # never read past a save in flight
        # The items' handler, not `manager.restore`: that ends in a barrier of all processes, where
        # the others would wait forever for a process whose read failed. `restore_agreed` gathers
        # every process's outcome instead, so all of them go on together or stop together.
        handler = ocp.CompositeCheckpointHandler()
        try:
            return handler.restore(self.directory / str(step), ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types: `error_kind` sorts them
            path = self.directory / str(step)
            kind = error_kind(e)
            what = f"{type(e).__name__}: {_first_line(e)}"
            if kind == "corrupt":
                message = (
                    f"checkpoint {path} is unreadable or corrupt ({what}). Delete {path} (or move it "
                    "aside) to fall back to the previous checkpoint, or start a fresh --workdir; `nagjax "
                    "train` falls back by itself unless train.strict_resume=true.")
            elif kind == "transient":
                message = (
                    f"could not read checkpoint {path} ({what}): a storage error, not damage to the "
                    "checkpoint; nothing was moved. Check the filesystem (permissions, mounts) and rerun.")
            else:
                message = (
                    f"checkpoint {path} does not fit this run's state ({what}); nothing was moved. If "
                    "another nagjax version wrote it, resume with that version or start a fresh --workdir.")
            raise CheckpointError(message, kind) from e
        finally:
            handler.close()

    def close(self) -> None:
        """Finish (or, on a second signal, abandon: never listed) the save in flight and stop."""
        self.manager.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OK, _CORRUPT, _FAILED, _UNLISTED = 0, 1, 2, 3


def restore_agreed(store: CheckpointStore, restore: Callable[[int], T], *, fallback: bool = True,
                   report: Callable[[str], None] | None = None) -> tuple[int, T] | None:
    """`(step, restore(step))` of the newest checkpoint that every process restores; None when
    there is none. The one restore policy of nagjax: the trainer, its rollbacks, `nagjax eval` and
    the CLI's saved-config lookup all ask it. A collective: every process calls it.

    Process 0 names each candidate (its newest listed step not yet passed over); every process
    tries it and all report, so every host takes the same step or stops together. A storage error
    (`kind="transient"`) is retried after each of RETRY_DELAYS seconds; if it persists, or an error
    is neither transient nor corruption, every process stops with an error naming the step and
    nothing is moved. Only when some process finds the checkpoint's own files damaged (`"corrupt"`)
    and `fallback` is set is it passed over for the next older one; once an older one restores,
    each passed-over checkpoint is reported (one line) and, unless the store is read-only, moved
    aside (`CheckpointStore.move_aside`). If none restores, nothing is moved and the error says so.
    Other exceptions (a config mismatch, an interrupt) propagate.
    """
    store.wait()
    passed: list[tuple[int, str]] = []  # (step, cause) of the corrupt checkpoints passed over
    first_error: CheckpointError | None = None
    while True:
        remaining = [s for s in store.all_steps() if s not in {p for p, _ in passed}]
        candidate = int(sharding.gather_from_processes([remaining[-1] if remaining else -1])[0, 0])
        if candidate < 0:
            break
        value, error, outcome = None, None, _UNLISTED
        if candidate in remaining:
            try:
                value, outcome = _with_retries(restore, candidate), _OK
            except CheckpointError as e:
                error, outcome = e, _CORRUPT if e.kind == "corrupt" else _FAILED
        outcomes = sharding.gather_from_processes([outcome])[:, 0]
        if (outcomes == _OK).all():
            for step, cause in passed:
                where = store.move_aside(step, cause)
                if report is not None and jax.process_index() == 0:
                    report(f"[nagjax] checkpoint {store.directory / str(step)} failed to restore ({cause}); "
                           f"{'moved it to ' + str(where) if where else 'left it in place'}, using step {candidate}")
            return candidate, value
        del value  # another process could not restore it: free this one's copy
        path = store.directory / str(candidate)
        if (outcomes == _FAILED).any() or (outcomes == _UNLISTED).any():
            if error is not None and outcome == _FAILED:
                raise error
            which = [i for i, o in enumerate(outcomes) if o in (_FAILED, _UNLISTED)]
            raise CheckpointError(
                f"process(es) {which} could not read or list checkpoint {path} (see their error); "
                "every process stops, nothing was moved", "transient")
        # some process found it damaged, none had another problem
        if not fallback:
            raise error or CheckpointError(
                f"checkpoint {path} is unreadable or corrupt on process(es) "
                f"{[i for i, o in enumerate(outcomes) if o == _CORRUPT]}; train.strict_resume=true: "
                "nothing was moved", "corrupt")
        first_error = first_error or error
        passed.append((candidate, _cause(error) if error else
                       f"reported by process(es) {[i for i, o in enumerate(outcomes) if o == _CORRUPT]}"))
    if len(passed) == 1 and first_error is not None:
        raise first_error
    if passed:  # every one: more likely another nagjax version's format than damage
        raise CheckpointError(
            f"no checkpoint in {store.directory} restores (steps {sorted(s for s, _ in passed)}; nothing "
            f"was moved). If another nagjax version wrote them, resume with that version or start a "
            f"fresh --workdir. The newest failed with {passed[0][1]}", "corrupt") from first_error
    return None


def _with_retries(restore: Callable[[int], T], step: int) -> T:
    """`restore(step)`, tried again after each of RETRY_DELAYS seconds while it fails with a
    storage error; the last error names the step, the cause and the number of tries."""
    for tries, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            return restore(step)
        except CheckpointError as e:
            if e.kind != "transient":
                raise
            if delay is None:
                raise CheckpointError(f"step {step}: {e} (tried {tries} times over "
                                      f"{sum(RETRY_DELAYS):g} s)", "transient") from e.__cause__
            print(f"[nagjax] reading checkpoint step {step} failed ({_cause(e)}); retrying in {delay:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _cause(error: CheckpointError) -> str:
    """`Type: first line` of what made a restore fail (Orbax's messages run to many lines)."""
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {_first_line(cause)}"


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
