"""What every benchmark script shares: one way to time, one way to save.

- `median_time(fn, *args, reps, inner, warmup)`: compile and warm-up calls outside the timed
  region, then `reps` samples of `inner` back-to-back calls each ended by `jax.block_until_ready`;
  returns the median seconds per call. `timed(fn, *args)` is one such call (seconds, output) for
  scripts that interleave variants and keep their own sample lists.
- `save(name, lines, command=...)`: writes `benchmarks/results/<name>_<device>[_<tag>].txt` with a header
  (the command, the device, the date) followed by what the script printed.
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, *args):
    """(seconds, output) of one call of `fn`, ended by `jax.block_until_ready` on its output."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def median_time(fn, *args, reps: int, inner: int = 1, warmup: int = 2) -> float:
    """Median seconds per call of `fn(*args)`: one compiling call and `warmup` calls untimed, then
    `reps` samples of `inner` back-to-back calls, each sample ended by `block_until_ready`."""
    import jax

    jax.block_until_ready(fn(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def device_slug(device=None) -> str:
    """`cpu` on CPU, else the device kind in lower case with `_` for other characters
    (`nvidia_h100_80gb_hbm3`, `tpu_v5p`)."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_") or device.platform


def describe_device(device=None) -> str:
    """`<count> x <kind> (<platform>), jax <version>, <n> CPU cores` for a results header."""
    import jax

    device = device or jax.devices()[0]
    return (f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}, "
            f"{os.cpu_count()} CPU cores")


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that produced a result, as typed: `python benchmarks/<script> ARGS`."""
    args = sys.argv[1:] if argv is None else argv
    return f"python benchmarks/{script} {' '.join(args)}".rstrip()


def save(name: str, lines: list[str], *, command: str, tag: str = "", append: bool = False) -> Path:
    """Write `lines` to `benchmarks/results/<name>_<device>[_<tag>].txt` after a header naming the
    command, the device and the date (`append`: after what the file already holds). Returns the path."""
    path = RESULTS / f"{name}_{device_slug()}{'_' + tag if tag else ''}.txt"
    header = [f"$ {command}", f"# {describe_device()}; {datetime.date.today()}"]
    previous = path.read_text() + "\n" if append and path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(previous + "\n".join([*header, *lines]) + "\n")
    print(f"saved {os.path.relpath(path, os.getcwd())}")
    return path
