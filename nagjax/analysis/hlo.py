"""Reading a compiled step's optimised HLO: what moves memory instead of computing.

`parse` turns `compiled.as_text()` into computations of instructions with operands and users.
`data_movement` counts, per executed step, the instructions whose only job is to move bytes
around the layer loop: standalone copies, copies of per-layer values into stacked buffers
(dynamic-update-slice of a value made elsewhere, e.g. a matmul output the backward pass keeps;
a fusion that computes the value and writes it into its slice is the producer writing its output,
not counted), slices out of stacked buffers (dynamic-slice: on a GPU, a contiguous one feeding a
cuBLAS/cuDNN call is a `memcpy` kernel), and the zero-filled stacked buffers a loop then
overwrites. Each is weighted by how often its
computation runs (a while body: its known trip count). `benchmarks/step.py --hlo` prints it;
tests assert on it. Fused instructions are not counted: a copy inside a fusion is a layout change
that the fusion's single pass does anyway. `collectives` counts, the same way, the communication a
step does per device (collective-permute, all-gather, all-reduce, reduce-scatter, all-to-all).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
DATA_ONLY = {"dynamic-slice", "copy", "transpose", "convert"}  # a fusion of only these just moves data
COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter", "all-to-all")
TRIVIAL = {"parameter", "constant", "bitcast", "broadcast", "iota", "reshape", "tuple", "get-tuple-element"}


@dataclass
class Instr:
    name: str
    op: str
    shape: str
    operands: list
    line: str
    calls: str | None = None
    users: list = field(default_factory=list)


@dataclass
class Module:
    comps: dict[str, dict[str, Instr]]  # computation -> {instruction name: Instr}
    entry: str


def _split_shape(rhs: str):
    """'(f32[2]{0}, bf16[3]{0}) custom-call(...' -> ('(f32[2]{0}, bf16[3]{0})', 'custom-call(...')."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[:i + 1], rhs[i + 1:].lstrip()
    shape, _, rest = rhs.partition(" ")
    return shape, rest


def parse(hlo: str) -> Module:
    """Optimised HLO text -> its computations, instructions with operands and users, and entry."""
    comps: dict[str, dict[str, Instr]] = {}
    current, entry = None, ""
    for line in hlo.splitlines():
        s = line.strip()
        if s.endswith("{") and "(" in s and " = " not in s.split("(")[0]:
            head = s.split("(")[0].split()
            current = head[-1].lstrip("%")
            comps[current] = {}
            if head[0] == "ENTRY":
                entry = current
            continue
        if s == "}" or current is None or " = " not in s:
            continue
        lhs, rhs = s.split(" = ", 1)
        name = lhs.replace("ROOT", "").strip().lstrip("%")
        shape, rest = _split_shape(rhs.strip())
        m = re.match(r"([a-z][\w\-]*)\((.*)", rest)
        if not m:
            continue
        op, args = m.group(1), m.group(2)
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = i
                break
        operands = re.findall(r"%?([\w.\-]+)", args[:end])
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        comps[current][name] = Instr(name, op, shape, operands, s, calls.group(1) if calls else None)
    for instrs in comps.values():
        for ins in instrs.values():
            ins.operands = [o for o in ins.operands if o in instrs]
            for o in ins.operands:
                instrs[o].users.append(ins.name)
    return Module(comps, entry)


def ops_of(ins: Instr, comps: dict) -> set[str]:
    """The non-trivial opcodes an instruction executes (a fusion: those of its body)."""
    if ins.op == "fusion" and ins.calls in comps:
        return {i.op for i in comps[ins.calls].values()} - TRIVIAL
    return {ins.op}


def nbytes(shape: str) -> int:
    """Bytes of an array shape such as 'bf16[8,2048,1024]{2,1,0}' (a tuple: the sum)."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]\w*)\[([\d,]*)\]", shape):
        total += DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def executions(module: Module) -> dict[str, int]:
    """How often each control-flow computation runs per call of the entry: a while body its
    parent's count x the loop's known trip count (1 when XLA does not know it); a conditional's
    branches and called computations as often as their caller. Fused computations are absent."""
    runs = {module.entry: 1}
    pending = [module.entry]
    while pending:
        comp = pending.pop()
        for ins in module.comps[comp].values():
            callees = []
            if ins.op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
                body = re.search(r"body=%?([\w.\-]+)", ins.line)
                cond = re.search(r"condition=%?([\w.\-]+)", ins.line)
                n = int(trip.group(1)) if trip else 1
                callees = [(body.group(1), n)] if body else []
                callees += [(cond.group(1), n + 1)] if cond else []
            elif ins.op in ("conditional", "call"):
                named = re.findall(r"(?:to_apply|true_computation|false_computation)=%?([\w.\-]+)", ins.line)
                branches = re.search(r"branch_computations=\{([^}]*)\}", ins.line)
                named += [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
                callees = [(c, 1) for c in named]
            for callee, n in callees:
                if callee in module.comps and callee not in runs:
                    runs[callee] = runs[comp] * n
                    pending.append(callee)
    return runs


def _root(body: dict[str, Instr]) -> Instr | None:
    return next((i for i in body.values() if i.line.startswith("ROOT")), None)


def _is_scalar(shape: str) -> bool:
    return re.match(r"^\w+\[\]", shape) is not None


def _kind(ins: Instr, comps: dict) -> str | None:
    """What data movement an unfused instruction is, if that is all it is."""
    if ins.op == "copy":
        return "copy"
    if ins.op == "dynamic-update-slice":
        return "stacked write"
    if ins.op == "dynamic-slice":
        return "slice"
    if ins.op != "fusion" or ins.calls not in comps:
        return None
    body = comps[ins.calls]
    root = _root(body)
    ops = ops_of(ins, comps)
    if root is not None and root.op == "dynamic-update-slice" and ops <= DATA_ONLY | {"dynamic-update-slice"}:
        return "stacked write"  # a value made elsewhere, copied into its stack (in place)
    if ops and ops <= DATA_ONLY and "dynamic-slice" in ops:
        return "slice"
    if not ops and all(i.op in ("broadcast", "constant", "parameter", "tuple", "bitcast") for i in body.values()):
        return "fill"  # materialises a constant: the zero buffer a loop then overwrites
    return None


def _written(ins: Instr, kind: str, module: Module, comp: str) -> int:
    """Bytes an instruction writes: a stacked write only its update (it runs in place)."""
    if kind == "stacked write":
        body = module.comps.get(ins.calls, {}) if ins.op == "fusion" else module.comps[comp]
        dus = ins if ins.op == "dynamic-update-slice" else _root(body)
        if dus is not None and len(dus.operands) > 1:
            return nbytes(body[dus.operands[1]].shape)
    return nbytes(ins.shape)


def data_movement(hlo: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": executions per step, "bytes": bytes written per step}} for kinds copy,
    stacked write, slice and fill (module docstring), plus "loops": while loops in the module."""
    module = parse(hlo)
    runs = executions(module)
    out = {k: {"count": 0, "bytes": 0} for k in ("copy", "stacked write", "slice", "fill")}
    loops = 0
    for comp, n in runs.items():
        for ins in module.comps[comp].values():
            loops += ins.op == "while"
            kind = _kind(ins, module.comps)
            if kind is None or nbytes(ins.shape) == 0 or ins.shape.startswith("("):
                continue
            if kind == "copy" and _is_scalar(ins.shape):
                continue  # a scalar: not data movement worth a kernel's name
            out[kind]["count"] += n
            out[kind]["bytes"] += n * _written(ins, kind, module, comp)
    out["loops"] = {"count": loops, "bytes": 0}
    return out


def format_movement(movement: dict) -> str:
    """One line: count and MiB per step of each kind."""
    parts = [f"{kind} {int(v['count'])} ({v['bytes'] / 2**20:,.1f} MiB)"
             for kind, v in movement.items() if kind != "loops"]
    return f"per step: {', '.join(parts)}; while loops {int(movement['loops']['count'])}"


def _tuple_elements(shape: str) -> list[str]:
    """'((f32[8]{0}), f32[32]{0}, u32[])' -> ['(f32[8]{0})', 'f32[32]{0}', 'u32[]']."""
    elements, depth, start = [], 0, 1
    for i, ch in enumerate(shape[1:-1], 1):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            elements.append(shape[start:i].strip())
            start = i + 1
    return elements + [shape[start:-1].strip()]


def _collective(ins: Instr, comps: dict) -> tuple[str, int] | None:
    """(kind, result bytes per device) of an unfused instruction that starts a collective.

    A synchronous collective's result is its shape. The async forms return a tuple whose
    element 1 is the result, as XLA prints them: `(operand, result, u32[], u32[])
    collective-permute-start`, `(operand, result) all-gather-start`, and for a wrapped
    collective `((operands), result, context...)` from `async-start(...), calls=%wrapped` or its
    sugared spelling `reduce-scatter-start` / `all-to-all-start`. `all-reduce-start` is the
    exception: its shape is the result itself (a tuple only when variadic: all of it counts), as
    is any start written without a tuple (hand-written HLO).
    Only the start is counted: the matching -done (and any -update) is the same transfer
    finishing."""
    kind = ins.op.removesuffix("-start")
    if ins.op == "async-start" and ins.calls in comps:
        kind = next((i.op for i in comps[ins.calls].values() if i.op in COLLECTIVES), None)
    if kind not in COLLECTIVES:
        return None
    if ins.op in COLLECTIVES or ins.op == "all-reduce-start" or not ins.shape.startswith("("):
        return kind, nbytes(ins.shape)
    return kind, nbytes(_tuple_elements(ins.shape)[1])


def collectives(hlo: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": executions per step, "bytes": result bytes per device per step}} for each
    kind in COLLECTIVES, each instruction weighted by how often its computation runs (a
    collective in a while body with a known trip count n: n times). Result bytes: `_collective`."""
    module = parse(hlo)
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for comp, n in executions(module).items():
        for ins in module.comps[comp].values():
            found = _collective(ins, module.comps)
            if found is not None:
                kind, result_bytes = found
                out[kind]["count"] += n
                out[kind]["bytes"] += n * result_bytes
    return out


def format_collectives(census: dict) -> str:
    """One line: count and MiB per step of each kind the step runs."""
    parts = [f"{kind} {int(v['count'])} ({v['bytes'] / 2**20:,.1f} MiB)"
             for kind, v in census.items() if v["count"]]
    return f"collectives per step: {', '.join(parts) or 'none'}"


def copied_inputs(hlo: str) -> list[str]:
    """Entry parameters (arrays, not scalars) that the step copies before using: with donated
    inputs, a copy means XLA could not update that buffer in place."""
    module = parse(hlo)
    entry = module.comps[module.entry]
    inputs = {name for name, ins in entry.items()
              if ins.op == "parameter" and not _is_scalar(ins.shape)}
    return [ins.line for ins in entry.values() if ins.op == "copy" and set(ins.operands) & inputs]
