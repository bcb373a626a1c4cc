"""What XLA puts next to the fused NAG update's custom calls in a compiled train step.

    python benchmarks/kernel_hlo.py                         # GPU/TPU: d=1024, 16 blocks, batch 8 x 2048
    python benchmarks/kernel_hlo.py --d 256 --depth 32 --batch 64 --seq 512 --mod 0.25 --remat full
    python benchmarks/kernel_hlo.py --dump step.hlo         # also write the optimised HLO

The H100 profile of a NAG-kernel train step showed ~80 more device copies per step than the
reference path (benchmarks/README.md). A Pallas call is an opaque custom call: XLA must hand it
operands in the row-major layout it was lowered for and materialise any slice it reads, so copies
appear exactly next to it. This script compiles the real train step (`training_state`, the
trainer's own), walks the optimised HLO and lists, for every kernel call, the producers of its
operands and the consumers of its outputs that only move data (copy, transpose, dynamic-slice,
slice, convert, concatenate, pad, dynamic-update-slice: as plain instructions or as fusions made
of nothing else), and the module's total count of copy / transpose instructions. On CPU the model
runs the reference (no custom call): the script then says so and exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nagjax.analysis.hlo import ops_of, parse  # noqa: E402

MOVES = {"copy", "transpose", "dynamic-slice", "slice", "convert", "concatenate", "pad",
         "dynamic-update-slice", "copy-start", "copy-done"}
PASS_THROUGH = {"bitcast", "get-tuple-element", "reshape"}
LAYOUT = {"copy", "transpose"}  # what the issue forbids next to the call


def _producer(name, instrs):
    ins = instrs[name]
    while ins.op in PASS_THROUGH and ins.operands:
        ins = instrs[ins.operands[0]]
    return ins


def _consumers(name, instrs):
    out = []
    for u in instrs[name].users:
        ins = instrs[u]
        out += _consumers(u, instrs) if ins.op in PASS_THROUGH else [ins]
    return out


def neighbours(hlo: str, match=("nag_update",)) -> list[dict]:
    """For each custom call whose text contains one of `match`: data-movement producers of its
    operands and consumers of its outputs, as {kernel, side, name, ops, shape, layout_change}."""
    comps = parse(hlo).comps
    found = []
    for instrs in comps.values():
        for ins in instrs.values():
            if ins.op != "custom-call" or not any(m in ins.line for m in match):
                continue
            kernel = next((m.group(1) for m in [re.search(r"(nag_update_\w+)", ins.line)] if m),
                          ins.name)
            sides = [("operand", _producer(o, instrs)) for o in ins.operands]
            sides += [("output", c) for c in _consumers(ins.name, instrs)]
            for side, other in sides:
                ops = ops_of(other, comps)
                if ops and ops <= MOVES:
                    found.append({"kernel": kernel, "side": side, "name": other.name,
                                  "ops": sorted(ops), "shape": other.shape,
                                  "layout_change": bool(ops & LAYOUT)})
    return found


def module_counts(hlo: str) -> dict[str, int]:
    comps = parse(hlo).comps
    counts = {"custom-call(nag_update)": 0, "copy": 0, "transpose": 0}
    for instrs in comps.values():
        for ins in instrs.values():
            if ins.op in ("copy", "transpose"):
                counts[ins.op] += 1
            if ins.op == "custom-call" and "nag_update" in ins.line:
                counts["custom-call(nag_update)"] += 1
    return counts


def compiled_train_step_hlo(d, depth, heads, batch, seq, vocab, mod_rate=0.0, remat="none",
                            kernel="auto", residual="nag"):
    """Optimised HLO of the trainer's own train step for a NAG model of that shape (bf16)."""
    import jax
    import numpy as np

    from nagjax.config import Config, DataConfig, ModConfig, ModelConfig, OptimConfig, TrainConfig
    from nagjax.model.residual.nag import NagConfig
    from nagjax.train.state import training_state

    model = ModelConfig(residual=residual, d_model=d, depth=depth, n_heads=heads, vocab_size=vocab,
                        compute_dtype="bfloat16", remat=remat, options=(NagConfig(kernel=kernel),))
    mod = ModConfig(rate=mod_rate, exempt_first_blocks=0) if mod_rate else ModConfig()
    config = Config(model=model, mod=mod, data=DataConfig(seq_len=seq, batch_size=batch),
                    optim=OptimConfig(), train=TrainConfig(steps=1000)).validate()
    spec = training_state(config)
    tokens = jax.ShapeDtypeStruct((batch, seq), np.int32)
    batch_d = {"inputs": tokens, "targets": tokens}
    lowered = spec.steps.train.lower(spec.abstract, batch_d, np.int32(10))
    return lowered.compile().as_text()


def report(hlo: str) -> list[str]:
    counts = module_counts(hlo)
    lines = ["module: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    if not counts["custom-call(nag_update)"]:
        lines.append("no nag_update custom call in this step (the reference update ran)")
        return lines
    found = neighbours(hlo)
    lines.append(f"data movement next to the kernel calls: {len(found)} "
                 f"({sum(f['layout_change'] for f in found)} copy/transpose)")
    for f in found:
        flag = "  COPY/TRANSPOSE" if f["layout_change"] else ""
        lines.append(f"  {f['kernel']:16s} {f['side']:7s} {f['name'][:40]:40s} "
                     f"{'+'.join(f['ops']):28s} {f['shape'][:60]}{flag}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--heads", type=int, default=0, help="0: d / 64 (the profile used 16 at d=1024)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--mod", type=float, default=0.0, help="Mixture-of-Depths rate (top-k)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--dump", default=None, help="write the optimised HLO here")
    args = ap.parse_args(argv)
    import jax

    hlo = compiled_train_step_hlo(args.d, args.depth, args.heads or max(1, args.d // 64),
                                  args.batch, args.seq, args.vocab, args.mod, args.remat,
                                  args.kernel)
    if args.dump:
        Path(args.dump).write_text(hlo)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; d={args.d} "
          f"depth={args.depth} batch {args.batch} x {args.seq} mod={args.mod} "
          f"remat={args.remat} kernel={args.kernel}")
    print("\n".join(report(hlo)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
