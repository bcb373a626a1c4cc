"""One trainer per workdir: an exclusive lock on `WORKDIR/nagjax.lock`, held while a run trains.

The lock is an advisory `flock` on the file, which the kernel drops when its holder exits in any
way, SIGKILL included: a lock left by a killed run is free, and the next `nagjax train` takes it
over by itself (it says whose it was). The file records the holder (host, pid, start time) so that
a refused second trainer names the run that is still alive. Only process 0 of a multi-process job
takes it (its processes share the workdir); every process then learns the outcome, so a refused job
stops on every host. A filesystem without locks (some FUSE mounts) gets a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

import jax

from nagjax import sharding

LOCK_NAME = "nagjax.lock"


class WorkdirLocked(RuntimeError):
    """Another live trainer holds the workdir; the message names it and what to do."""


class WorkdirLock:
    def __init__(self, workdir: str | Path):
        self.path = Path(workdir).absolute() / LOCK_NAME
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> str | None:
        """Take the lock or raise WorkdirLocked. Returns the holder line of a stale lock taken
        over (its process is gone), else None."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            f.close()
            raise WorkdirLocked(
                f"{self.path.parent} is in use by another `nagjax train` ({holder}); two trainers on one "
                f"workdir would interleave their checkpoints. Wait for it to finish or stop it (a killed "
                f"run's lock is freed by itself), or choose another --workdir.") from None
        except OSError as e:
            f.close()
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"[nagjax] warning: {self.path.parent} is on a filesystem without file locks "
                  f"({e.strerror}); a second trainer on this workdir would not be refused.", file=sys.stderr)
            return None
        f.seek(0)
        stale = f.read().strip() or None  # a released lock is emptied: text here is a dead holder's
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, "
                f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
        self._file = f
        return stale

    def release(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        f.truncate(0)  # emptied while still held: the next holder sees a clean release
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def lock_workdir(workdir: str | Path) -> WorkdirLock:
    """The workdir's lock, taken by process 0 and agreed by all: every process raises
    WorkdirLocked when process 0 was refused (none of them touches the workdir)."""
    lock = WorkdirLock(workdir)
    refusal = None
    if jax.process_index() == 0:
        try:
            stale = lock.acquire()
        except WorkdirLocked as e:
            refusal = e
        else:
            if stale:
                print(f"[nagjax] took over the lock of {lock.path.parent} from a run that is gone "
                      f"({stale})", file=sys.stderr, flush=True)
    refused = sharding.gather_from_processes([refusal is not None])[0, 0]
    if refused:
        raise refusal or WorkdirLocked(f"{lock.path.parent} is in use by another `nagjax train` "
                                       "(process 0 of this job was refused; see its message)")
    return lock
