"""Decode speed of a trained NAG + Mixture-of-Depths model: the latency dial, measured.

Trains a NAG model with MoD (r = 0.25 on all sublayers but the first block, kv=kept) for a few
minutes on the embedded corpus, or loads `--workdir`, then generates at batch 1: prompt from the
validation text, prefill in one pass, then sampled at temperature 1 with a fixed seed (a briefly
trained model repeats itself under greedy decoding). Densely, and with causal thresholds for
r = 0, 0.125, 0.25, 0.5 calibrated under skipping on validation data (as `nagjax sample
--mod-rate R`), where a skipped sublayer is really not computed. Prints decode time per token
(median and best of interleaved repeats, compile excluded), tokens/s, the speed-up over dense next
to the FLOP ratio, the realised skip rate, and whether the tokens equal those of the compute-and-
discard path at the same thresholds (the r = 0.25 reference path is timed too). A batch-8 row
reports the saving that survives batching (a sublayer runs when any row executes it).
Target (issue): on CPU, >= 12 blocks at d >= 256, r = 0.25 decodes at >= 1.2x the dense tokens/s.

    python benchmarks/decode.py                  # CPU: trains 12 x d512 (a few minutes)
    python benchmarks/decode.py --d-model 256    # 12 x d256: fixed per-op costs weigh more
    python benchmarks/decode.py --workdir DIR    # a trained NAG run (else trains into DIR and keeps it)
    python benchmarks/decode.py --gpu            # GPU-sized model (bfloat16), trained briefly
    add --save to write benchmarks/results/decode_<device>.txt (decode_cpu.txt on CPU)

Timing: each figure is the decode loop's own clock (`Generation.seconds_per_token`: prefill and
compile excluded), one sample per variant per repeat, variants interleaved in a random order;
medians over repeats. Saving goes through benchmarks/common.py like every benchmark here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from nagjax.analysis.diagnostics import checkpoint_steps, load_run, validation_batches
from nagjax.config import Config, DataConfig, ModConfig, ModelConfig, OptimConfig, TrainConfig, require_skip_signal
from nagjax.infer.calibration import calibrate_thresholds
from nagjax.infer.sample import generate_ids
from nagjax.train.trainer import train

from benchmarks import common  # noqa: E402 - the shared saving helper

RATES = (0.0, 0.125, 0.25, 0.5)


def bench_config(gpu: bool, steps: int, d_model: int, depth: int) -> Config:
    model = ModelConfig(residual="nag", d_model=d_model, depth=depth, n_heads=max(1, d_model // 64))
    if gpu:
        data = DataConfig(seq_len=512, batch_size=32, vocab_size=4096)
    else:
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
    ap.add_argument("--workdir", default=None,
                    help="a trained NAG run, or where to train one and keep it (default: a temporary folder)")
    ap.add_argument("--gpu", action="store_true", help="GPU-sized model (24 x d1024, bfloat16)")
    ap.add_argument("--d-model", type=int, default=None, help="default: 512 (CPU), 1024 (--gpu)")
    ap.add_argument("--depth", type=int, default=None, help="default: 12 (CPU), 24 (--gpu)")
    ap.add_argument("--train-steps", type=int, default=None, help="default: 100 (CPU), 300 (--gpu)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched row (0: skip it)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/decode_<device>.txt")
    ap.add_argument("--append", action="store_true", help="with --save: add to the file instead")
    args = ap.parse_args()
    lines = [f"# MoD decode speed; load average {os.getloadavg()[0]:.1f} at start"]

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    print(f"$ {common.command_line('decode.py')}\n# {common.describe_device()}")
    for line in lines:
        print(line)
    steps = args.train_steps or (300 if args.gpu else 100)
    d_model, depth = args.d_model or (1024 if args.gpu else 512), args.depth or (24 if args.gpu else 12)
    tmp = tempfile.TemporaryDirectory(prefix="nagjax_decode_") if args.workdir is None else None
    workdir = Path(tmp.name if tmp else args.workdir)
    if (workdir / "checkpoints").is_dir() and checkpoint_steps(workdir):
        trained = f"trained run {workdir}"  # its step is printed below
    else:
        result = train(bench_config(args.gpu, steps, d_model, depth), workdir)
        trained = f"trained here: {steps} steps, validation loss {result.val_loss:.3f}"
    run = load_run(workdir)
    cfg = run.config
    require_skip_signal(cfg.model.residual, "benchmarks/decode.py")
    m = cfg.model
    say(f"# model: {m.residual} d={m.d_model} depth={m.depth} heads={m.n_heads} vocab={m.vocab_size} "
        f"({m.compute_dtype}); MoD kv={cfg.mod.kv}, sublayers={cfg.mod.sublayers}, exempt first "
        f"{cfg.mod.exempt_first_blocks} block(s); {trained}, step {run.step}")

    batches = validation_batches(cfg, cfg.train.eval_batches)
    prompt = [int(t) for t in batches[0]["inputs"][0, :args.prompt_tokens]]
    skipping = [r for r in RATES if r > 0]
    tau = dict(zip(skipping, np.moveaxis(calibrate_thresholds(
        run.graphdef, run.params, batches, tuple(skipping), under_skipping=True), -1, 0)))
    tau[0.0] = np.full((m.depth, 2), -np.inf)  # r = 0: every token executes, through the skipping path
    say(f"# batch 1, prompt {len(prompt)} tokens (validation text), {args.new_tokens} new tokens (temperature 1, "
        f"seed 0, no EOS stop); thresholds calibrated under skipping on {len(batches)} validation batches; "
        f"{args.repeats} interleaved repeats, compile excluded")

    def gen(thresholds, real_skip=True, rows=1, seed=0):
        return generate_ids(run.graphdef, run.params, [prompt] * rows, eos_id=-1, max_new_tokens=args.new_tokens,
                            thresholds=thresholds, real_skip=real_skip, temperature=1.0, seed=seed)

    variants = [("dense", None, True)] + [(f"r={r:g}", tau[r], True) for r in RATES]
    variants.append(("r=0.25 discard", tau[0.25], False))
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
    last = {}
    order = np.random.default_rng(0)
    for _ in range(args.repeats):  # every variant once per repeat, in a random order
        for i in order.permutation(len(variants)):
            name, thresholds, real = variants[i]
            out = gen(thresholds, real)
            times[name].append(out.seconds_per_token)
            last[name] = out
    reference = {r: gen(tau[r], real_skip=False).tokens for r in RATES}  # compute-and-discard tokens

    say(f"{'variant':<15} {'ms/token':>8} {'best':>6} {'tokens/s':>8} {'speed-up':>8} {'IQR':>11} {'FLOPs':>6} "
        f"{'skip all/eligible':>17} {'calls saved':>11}  same tokens as discard")
    dense = np.asarray(times["dense"])
    for name, thresholds, real in variants:
        mine, out = np.asarray(times[name]), last[name]
        ratio = dense / mine  # paired: the dense run of the same repeat
        same = "-"
        if thresholds is not None:
            rate = next(r for r in RATES if tau[r] is thresholds)
            same = "yes" if out.tokens == reference[rate] else "NO"
        say(f"{name:<15} {np.median(mine) * 1e3:>8.2f} {mine.min() * 1e3:>6.2f} {1 / np.median(mine):>8.1f} "
            f"{np.median(ratio):>7.2f}x {np.quantile(ratio, 0.25):>5.2f}-{np.quantile(ratio, 0.75):.2f} "
            f"{out.flops_per_token / out.dense_flops_per_token:>6.3f} "
            f"{out.skip_rate:>8.3f} / {out.skip_rate_eligible:.3f} {out.calls_saved:>11.3f}  {same}")
    say("# ms/token: median (best) decode time per token; speed-up: median over repeats of dense time / variant "
        "time in the same repeat (IQR: its quartiles); FLOPs: forward FLOPs per decoded token relative to dense "
        "(the ideal speed-up is its inverse); skip: realised skip rate of the decoded tokens, over all sublayers "
        "/ the eligible ones; calls saved: sublayer calls not computed")

    if args.batch > 1:
        say(f"# batch {args.batch}, the same prompt in every row (rows differ by sampling): a sublayer is "
            f"computed when any row executes it")
        rows = {}
        pair = (("dense", None), ("r=0.25", tau[0.25]))
        for _ in range(max(1, args.repeats // 2)):
            for i in order.permutation(2):
                name, thresholds = pair[i]
                rows.setdefault(name, []).append(gen(thresholds, rows=args.batch))
        base = np.asarray([o.seconds_per_token for o in rows["dense"]])
        for name, outs in rows.items():
            mine, out = np.asarray([o.seconds_per_token for o in outs]), outs[-1]
            say(f"batch {args.batch} {name:<8} {np.median(mine) * 1e3:>8.2f} ms/step "
                f"{args.batch / np.median(mine):>8.1f} tokens/s {np.median(base / mine):>6.2f}x  skip "
                f"{out.skip_rate:.3f}, calls saved {out.calls_saved:.3f}, computed FLOPs "
                f"{out.computed_flops_per_token / out.dense_flops_per_token:.3f} of dense")
    if args.save:
        common.save("decode", lines, command=common.command_line("decode.py"), append=args.append)


if __name__ == "__main__":
    main()
