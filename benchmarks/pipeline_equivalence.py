"""Pipelined loss and gradients against one device, for every scheme x layout of
tests/pipeline_child.py (the test suite checks one layout per scheme; this is the whole matrix).

    python benchmarks/pipeline_equivalence.py [--save]

Runs on 8 forced CPU devices in a subprocess and prints one row per case: the 1-device loss, the
absolute loss difference, the largest absolute gradient difference and the largest gradient entry.
`--save` also writes benchmarks/results/pipeline_equivalence_cpu.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402 - the shared saving helper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "pipeline_child.py"), "all"], env=env,
                         capture_output=True, text=True, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    lines = ["# in a child process on 8 forced CPU devices, float32; tiny model d=32, 4 blocks unless the "
             "layout says 8, batch 16 x 32",
             f"{'scheme:layout':<40} {'loss':>10} {'|dloss|':>10} {'max|dgrad|':>11} {'max|grad|':>10} {'iters':>5}"]
    for case, r in results.items():
        lines.append(f"{case:<40} {r['loss']:>10.5f} {r['loss_diff']:>10.2e} {r['grad_diff']:>11.2e} "
                     f"{r['grad_scale']:>10.3f} {r['iterations']:>5}")
    worst = max(r["grad_diff"] / r["grad_scale"] for r in results.values())
    lines.append(f"largest gradient difference relative to the largest gradient entry: {worst:.2e}")
    print("\n".join(lines))
    if args.save:
        common.save("pipeline_equivalence", lines, command=common.command_line("pipeline_equivalence.py"))


if __name__ == "__main__":
    main()
