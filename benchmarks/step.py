"""Train-step wall-clock of every residual variant, next to what its FLOPs promise.

Times Pre-LN, NAG (reference update and Pallas kernel) and NAG + Mixture-of-Depths at r = 0.125 /
0.25 / 0.5 on one model shape and batch, each built exactly as the trainer builds it
(`training_state`), in one process. Prints per variant: median step time, tokens/s, MFU (on
devices in nagjax's peak table), training FLOPs per token, and for MoD the measured step-time
ratio against dense NAG next to the FLOP-counter ideal. `--profile` traces three steps of each
variant with `jax.profiler` (perfetto JSON, no extra package) and prints its top device kernels,
with the share of device time in copies (memcpy / copy) and dynamic-update-slice fusions; `--hlo`
prints what the optimised HLO moves per step instead of computing (copies, writes into and slices
out of the scan's stacked buffers, zero fills: count and MiB; nagjax/analysis/hlo.py) and the
collectives it runs per device (count and MiB of each kind).

    python benchmarks/step.py --size 350m --profile --save        # one H100: the 350M config
    python benchmarks/step.py --size d256x32 --profile --save     # d=256, 32 blocks, 64 x 512
    python benchmarks/step.py --size cpu --rounds 5 --save        # CPU: d=256, 6 blocks, 8 x 256
    add --set KEY=VALUE ... (e.g. model.remat=dots_attention train.grad_accum=2) to every variant,
    --compare KEY=VALUE ... to time every variant with and without them (with --rounds: interleaved),
    --variants prenorm,nag to choose, --xla-flags "..." to try XLA flags (set before jax starts).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402 - the shared timing and saving helpers

# name -> (overrides of the base config, global batch, seq_len); `350m` is scale_350m_*_1gpu.
SIZES = {
    "350m": (["model.d_model=1024", "model.depth=24", "model.n_heads=16", "model.vocab_size=32768",
              "model.remat=full"], 16, 2048),
    "d256x32": (["model.d_model=256", "model.depth=32", "model.n_heads=4", "model.vocab_size=32768"], 64, 512),
    "cpu": (["model.d_model=256", "model.depth=6", "model.n_heads=4", "model.vocab_size=2048"], 8, 256),
}
# variant -> overrides; MoD rounds k to whole 64-token tiles and skips in every block but the first
# (on the CPU size, in every block: the earlier mod_step benchmark's setting).
VARIANTS = {
    "prenorm": ["model.residual=prenorm"],
    "nag": ["model.residual=nag"],
    "nag_kernel": ["model.residual=nag", "model.nag.kernel=pallas"],
    **{f"mod_{r:g}": ["model.residual=nag", f"mod.rate={r}", "mod.kept_multiple=64"] for r in (0.125, 0.25, 0.5)},
}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--variants", default=None, help="comma-separated (default: all; on CPU all but nag_kernel)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the variants in this many interleaved rounds (all compiled and held at "
                         "once), so that a machine's drift hits every variant alike (on a shared CPU)")
    ap.add_argument("--profile", action="store_true", help="trace 3 steps per variant, print top kernels")
    ap.add_argument("--hlo", action="store_true",
                    help="bytes moved per step by copies, stacked writes/slices and fills (optimised HLO)")
    ap.add_argument("--compare", nargs="*", default=[], metavar="KEY=VALUE",
                    help="also time every variant with these overrides (rows NAME+, ratio to NAME); "
                         "use with --rounds so both are timed interleaved")
    ap.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this run (appended)")
    ap.add_argument("--save", action="store_true", help="write the output to benchmarks/results/")
    ap.add_argument("--tag", default="", help="suffix of the saved file's name (e.g. unrolled)")
    return ap.parse_args(argv)


def build(size: str, variant: str, extra: list[str]):
    from nagjax.config import Config, apply_overrides
    from nagjax.train.state import training_state

    shape, batch, seq = SIZES[size]
    mod_everywhere = ["mod.exempt_first_blocks=0"] if size == "cpu" and variant.startswith("mod") else []
    cfg = apply_overrides(Config(name=variant), [
        *shape, f"data.batch_size={batch}", f"data.seq_len={seq}", "optim.warmup_steps=0",
        "train.steps=1000", *VARIANTS[variant], *mod_everywhere, *extra])
    return cfg, training_state(cfg)


class Runner:
    """One variant's compiled step, warmed up, with its state and batch; `run(n)` times n steps."""

    def __init__(self, spec, cfg):
        import jax

        self.state = spec.init()
        tokens = jax.random.randint(jax.random.key(0), (cfg.data.batch_size, cfg.data.seq_len + 1), 0,
                                    cfg.model.vocab_size)
        self.batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        self.compiled = spec.steps.train.lower(self.state, self.batch, 0).compile()
        self.times: list[float] = []
        self.step = 0
        self.run(2, record=False)  # warm up

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            seconds, (self.state, _) = common.timed(self.compiled, self.state, self.batch, self.step)
            self.step += 1
            if record:
                self.times.append(seconds)


def hlo_census(compiled) -> list[str]:
    """Bytes the optimised step moves around the layer loop instead of computing, per step
    (nagjax/analysis/hlo.py: copies, stacked writes, slices of stacked buffers, zero fills), and
    the collectives it runs per device."""
    from nagjax.analysis import hlo

    optimised = compiled.as_text()
    return ["  HLO " + hlo.format_movement(hlo.data_movement(optimised)),
            "  HLO " + hlo.format_collectives(hlo.collectives(optimised))]


def top_kernels(compiled, runner: Runner, n: int = 12) -> list[str]:
    """Device kernels of 3 traced steps, by total time (from the perfetto trace jax writes)."""
    import jax

    state, batch = runner.state, runner.batch
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(3):
                state, metrics = compiled(state, batch, i)
            jax.block_until_ready(metrics)
        files = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not files:
            return ["  (no perfetto trace written)"]
        trace = json.load(gzip.open(files[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}

    def on_device(e) -> bool:  # GPU/TPU streams; on CPU the XLA worker threads' ops (not the executor)
        process = processes.get(e.get("pid"), "")
        if "/device:" in process:
            return True
        thread = names.get((e.get("pid"), e.get("tid")), "")
        return (jax.default_backend() == "cpu" and thread.startswith("tf_XLA")
                and not e["name"].startswith(("ThunkExecutor", "SlinkyThreadPool")))

    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and on_device(e):
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    all_us = sum(total.values()) or 1.0
    copy_us = sum(v for k, v in total.items() if "memcpy" in k.lower() or k.lower().startswith("copy"))
    dus_us = sum(v for k, v in total.items() if "dynamic_update_slice" in k or "dynamic-update-slice" in k)
    lines = [f"  device time over 3 steps {all_us / 1e3:.1f} ms; copies {100 * copy_us / all_us:.1f}%, "
             f"dynamic-update-slice {100 * dus_us / all_us:.1f}%; top kernels (ms, calls, share):"]
    for name, us in total.most_common(n):
        lines.append(f"    {us / 1e3:9.2f} {calls[name]:6d} {100 * us / all_us:5.1f}%  {name[:100]}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import jax

    from nagjax import flops

    on_cpu = jax.default_backend() == "cpu"
    names = args.variants.split(",") if args.variants else [v for v in VARIANTS if not (on_cpu and v == "nag_kernel")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    device = jax.devices()[0]
    shape, batch, seq = SIZES[args.size]
    lines = [f"# benchmarks/step.py --size {args.size} {' '.join(args.overrides)} - {datetime.date.today()}, "
             f"{len(jax.devices())} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
             + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if args.xla_flags else ""),
             f"# {' '.join(shape)}, batch {batch} x {seq}; median of {args.steps} steps after 2 warm-up steps"
             + (f", in {args.rounds} interleaved rounds" if args.rounds > 1 else "")
             + "; ratio: MoD step time / dense NAG's" + (f", NAME+ ({' '.join(args.compare)}) / NAME" if args.compare else ""),
             f"{'variant':<12} {'step ms':>9} {'tokens/s':>11} {'MFU':>6} {'MFLOP/tok':>10} "
             f"{'ratio':>7} {'FLOP ideal':>10} {'temp GiB':>9}"]
    print("\n".join(lines), flush=True)
    built = {}
    for name in names:
        built[name] = build(args.size, name, args.overrides)
        if args.compare:
            built[name + "+"] = build(args.size, name, [*args.overrides, *args.compare])
    runners = {}
    if args.rounds > 1:  # compile all, then interleave
        runners = {name: Runner(spec, cfg) for name, (cfg, spec) in built.items()}
        for r in range(args.rounds):
            for runner in runners.values():
                runner.run(args.steps // args.rounds + (r < args.steps % args.rounds))
    results, profiles = {}, []
    for name, (cfg, spec) in built.items():
        runner = runners.get(name)
        if runner is None:
            runner = Runner(spec, cfg)
            runner.run(args.steps)
        seconds, compiled = statistics.median(runner.times), runner.compiled
        per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        tok_s = cfg.data.batch_size * cfg.data.seq_len / seconds
        util = flops.mfu(tok_s, per_token, device.device_kind, jax.device_count())
        mem = compiled.memory_analysis()
        results[name] = (seconds, per_token)
        base = results.get(name[:-1] if name.endswith("+") else "nag" if name.startswith("mod") else None)
        ratio = f"{seconds / base[0]:7.3f} {per_token / base[1]:10.3f}" if base else " " * 18
        line = (f"{name:<12} {seconds * 1e3:9.1f} {tok_s:11,.0f} {'' if util is None else f'{100 * util:5.1f}%':>6} "
                f"{per_token / 1e6:10.1f} {ratio} "
                f"{'' if mem is None else f'{mem.temp_size_in_bytes / 2**30:9.2f}'}")
        lines.append(line)
        print(line, flush=True)
        if args.hlo or args.profile:
            profiles.append(f"{name}:")
        if args.hlo:
            profiles += hlo_census(compiled)
        if args.profile:
            profiles += top_kernels(compiled, runner)
        if name not in runners:
            del runner  # free the device before the next variant
    if profiles:
        lines += ["", *profiles]
        print("\n".join(["", *profiles]))
    if args.save:
        common.save(f"step_{args.size}", lines, command=common.command_line("step.py", argv), tag=args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
