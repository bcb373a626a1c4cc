"""Decode speed of a trained NAG + Mixture-of-Depths model: the latency dial, measured.

Trains a NAG model with MoD (r = 0.25 on all sublayers but the first block, kv=kept) for a few
minutes on the embedded corpus, or loads `--workdir`, then generates at batch 1 (greedy, prompt
from the validation text, prefill in one pass) densely and with causal thresholds calibrated for
r = 0, 0.125, 0.25, 0.5, where a skipped sublayer is really not computed. Prints decode time per
token (median of interleaved repeats, compile excluded), tokens/s, the speed-up over dense next to
the FLOP ratio, the realised skip rate, and whether the tokens equal those of the compute-and-
discard path at the same thresholds (the r = 0.25 reference path is timed too). A batch-8 row
reports the saving that survives batching (a sublayer runs when any row executes it).
Target (issue): on CPU, 12 blocks at d = 256, r = 0.25 decodes at >= 1.2x the dense tokens/s.

    python benchmarks/decode.py                  # CPU: trains 12 x d256 (a few minutes)
    python benchmarks/decode.py --workdir DIR    # a trained run (NAG; its thresholds are calibrated)
    python benchmarks/decode.py --gpu            # GPU-sized model (bfloat16), trained briefly
    add --save to write benchmarks/results/decode_<cpu|gpu>.txt
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from nagjax.analysis.diagnostics import load_run, validation_batches
from nagjax.config import Config, DataConfig, ModConfig, ModelConfig, OptimConfig, TrainConfig
from nagjax.infer.sample import generate_ids
from nagjax.model import mod as modlib
from nagjax.train.trainer import train

RATES = (0.0, 0.125, 0.25, 0.5)


def bench_config(gpu: bool, steps: int) -> Config:
    if gpu:
        model = ModelConfig(residual="nag", d_model=1024, depth=24, n_heads=16)
        data = DataConfig(seq_len=512, batch_size=32, vocab_size=4096)
    else:
        model = ModelConfig(residual="nag", d_model=256, depth=12, n_heads=4)
        data = DataConfig(seq_len=64, batch_size=8, vocab_size=4096)
    return Config(
        name="decode_bench", model=model, data=data,
        mod=ModConfig(rate=0.25, sublayers="both", exempt_first_blocks=1, kv="kept"),
        optim=OptimConfig(lr=3e-3, warmup_steps=max(1, steps // 10)),
        train=TrainConfig(steps=steps, eval_every=0, eval_batches=4, checkpoint_every=steps,
                          log_every=max(1, steps // 5), progress_bar=False, keep_checkpoints=1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="a trained NAG run (default: train one in a temporary folder)")
    ap.add_argument("--gpu", action="store_true", help="GPU-sized model (24 x d1024, bfloat16)")
    ap.add_argument("--train-steps", type=int, default=None, help="default: 150 (CPU), 300 (--gpu)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched row (0: skip it)")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    device = jax.devices()[0]
    lines = [f"$ python benchmarks/decode.py {' '.join(sys.argv[1:])}".rstrip(),
             f"# MoD decode speed — {datetime.date.today()}, {device.platform} ({device.device_kind}), "
             f"jax {jax.__version__}"]

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)
    steps = args.train_steps or (300 if args.gpu else 150)
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nagjax_decode_")
        workdir = Path(tmp.name)
        result = train(bench_config(args.gpu, steps), workdir)
        trained = f"trained here: {steps} steps, validation loss {result.val_loss:.3f}"
    else:
        workdir = Path(args.workdir)
        trained = f"workdir {workdir}"
    run = load_run(workdir)
    cfg = run.config
    modlib.require_skip_signal(cfg.model, "benchmarks/decode.py")
    m = cfg.model
    say(f"# model: {m.residual} d={m.d_model} depth={m.depth} heads={m.n_heads} vocab={m.vocab_size} "
        f"({m.compute_dtype}); MoD kv={cfg.mod.kv}, sublayers={cfg.mod.sublayers}, exempt first "
        f"{cfg.mod.exempt_first_blocks} block(s); {trained}")

    batches = validation_batches(cfg, cfg.train.eval_batches)
    prompt = [int(t) for t in batches[0]["inputs"][0, :args.prompt_tokens]]
    skipping = [r for r in RATES if r > 0]
    tau = dict(zip(skipping, np.moveaxis(modlib.calibrate_thresholds(
        run.graphdef, run.params, batches, cfg.mod, tuple(skipping)), -1, 0)))
    tau[0.0] = np.full((m.depth, 2), -np.inf)  # r = 0: every token executes, through the skipping path
    say(f"# batch 1, prompt {len(prompt)} tokens (validation text), {args.new_tokens} new tokens (greedy, no EOS "
        f"stop); thresholds calibrated on {len(batches)} validation batches; median of {args.repeats} "
        f"interleaved repeats, compile excluded")

    def gen(thresholds, real_skip=True, rows=1):
        return generate_ids(run.graphdef, run.params, [prompt] * rows, eos_id=-1,
                            max_new_tokens=args.new_tokens, thresholds=thresholds, real_skip=real_skip)

    variants = [("dense", None, True)] + [(f"r={r:g}", tau[r], True) for r in RATES]
    variants.append(("r=0.25 discard", tau[0.25], False))
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
    last = {}
    for _ in range(args.repeats):
        for name, thresholds, real in variants:
            out = gen(thresholds, real)
            times[name].append(out.seconds_per_token)
            last[name] = out
    reference = {r: gen(tau[r], real_skip=False).tokens for r in RATES}  # compute-and-discard tokens

    say(f"{'variant':<15} {'ms/token':>9} {'min':>7} {'tokens/s':>9} {'speed-up':>9} {'FLOPs':>6} "
        f"{'skip (all/eligible)':>20} {'calls saved':>11}  same tokens as discard")
    dense = statistics.median(times["dense"])
    for name, thresholds, real in variants:
        med, out = statistics.median(times[name]), last[name]
        same = "-"
        if thresholds is not None:
            rate = next(r for r in RATES if tau[r] is thresholds)
            same = "yes" if out.tokens == reference[rate] else "NO"
        say(f"{name:<15} {med * 1e3:>9.2f} {min(times[name]) * 1e3:>7.2f} {1 / med:>9.1f} {dense / med:>8.2f}x "
            f"{out.flops_per_token / out.dense_flops_per_token:>6.3f} "
            f"{out.skip_rate:>10.3f} / {out.skip_rate_eligible:.3f} {out.calls_saved:>11.3f}  {same}")
    say("# speed-up: dense ms/token / variant ms/token (medians); FLOPs: forward FLOPs per decoded token "
        "relative to dense (the ideal speed-up is its inverse); calls saved: sublayer calls not computed")

    if args.batch > 1:
        say(f"# batch {args.batch} (the same prompt in every row, sampled at temperature 1 so that rows "
            f"differ): a sublayer is computed when any row executes it")
        rows = {}
        for _ in range(max(1, args.repeats // 2)):
            for name, thresholds in (("dense", None), ("r=0.25", tau[0.25])):
                out = generate_ids(run.graphdef, run.params, [prompt] * args.batch, eos_id=-1,
                                   max_new_tokens=args.new_tokens, thresholds=thresholds, temperature=1.0,
                                   seed=1)
                rows.setdefault(name, []).append(out)
        base = statistics.median(o.seconds_per_token for o in rows["dense"])
        for name, outs in rows.items():
            med = statistics.median(o.seconds_per_token for o in outs)
            out = outs[-1]
            say(f"batch {args.batch} {name:<8} {med * 1e3:>8.2f} ms/step {out.tokens_per_second:>9.1f} tokens/s "
                f"{base / med:>6.2f}x  skip {out.skip_rate:.3f}, calls saved {out.calls_saved:.3f}, "
                f"computed FLOPs {out.computed_flops_per_token / out.dense_flops_per_token:.3f} of dense")
    if args.save:
        path = Path(__file__).parent / "results" / f"decode_{'gpu' if args.gpu else 'cpu'}.txt"
        path.write_text("\n".join(lines) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
