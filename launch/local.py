#!/usr/bin/env python
"""Start N nagjax processes on this machine, each with its own CPU devices, as one multi-host job.

    python launch/local.py --processes 2 --devices-per-process 4 -- \
        train --experiment quickstart --workdir runs/mp --set mesh.data=2 mesh.fsdp=4

Every process runs `python -m nagjax.cli ARGS...` with JAX_PLATFORMS=cpu, its own
`--xla_force_host_platform_device_count`, and NAGJAX_COORDINATOR_ADDRESS / NAGJAX_NUM_PROCESSES /
NAGJAX_PROCESS_ID, which `nagjax.runtime.initialize_distributed` hands to `jax.distributed`. So the
multi-host code path (distributed init, per-process data shards, global arrays, cross-process
collectives over gloo, one checkpoint writer) runs exactly as on a pod, without one. Output lines
are prefixed with the process index; if one process fails the others are stopped, and the exit
status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, n: int, devices: int, port: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        NAGJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        NAGJAX_NUM_PROCESSES=str(n),
        NAGJAX_PROCESS_ID=str(index),
    )
    return env


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{index}] {line}")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", "-n", type=int, default=2)
    parser.add_argument("--devices-per-process", "-d", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then nagjax CLI arguments")
    args = parser.parse_args(argv)
    cli_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not cli_args:
        parser.error("give the nagjax command after --, e.g. -- train --experiment quickstart")
    port = args.port or free_port()
    procs, pumps = [], []
    for i in range(args.processes):
        proc = subprocess.Popen(
            [sys.executable, "-m", "nagjax.cli", *cli_args],
            env=process_env(i, args.processes, args.devices_per_process, port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(i, proc.stdout, sys.stdout), daemon=True)
        pump.start()
        pumps.append(pump)
    status = 0
    try:
        pending = list(procs)
        while pending:
            for proc in list(pending):
                try:
                    rc = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(proc)
                if rc != 0 and status == 0:
                    status = rc
                    for other in pending:  # a peer would hang at the next collective
                        other.terminate()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        status = 130
    for pump in pumps:
        pump.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
