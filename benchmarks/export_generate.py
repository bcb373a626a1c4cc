"""Per-token `generate` time of the remote-code export (transformers, PyTorch) with and without its
KV cache, at a short and a long prefix: with the cache the time per token stays flat as the
prefix grows; without it every token recomputes the whole prefix.

A NAG model (`--d-model`, `--depth`; random weights, written as the trainer writes a checkpoint)
is exported with `nagjax export`, loaded with AutoModelForCausalLM(trust_remote_code=True), and
greedily extends a prefix of 32 and of 512 tokens by `--new` tokens, one forward call per token
as `generate` makes them: with the cache, the new token against a DynamicCache; without, the
whole sequence again. Each call is timed on its own; the median (and the best) over all calls
of `--reps` repeats is reported, the variants interleaved within each repeat (the machine is
shared: medians of single calls, interleaved, resist other jobs' load better than totals). First, `generate` with and without the cache is checked to give the same tokens.
Needs torch + transformers (the /work/venv-hf environment, or `pip install torch transformers`).

    python benchmarks/export_generate.py --save   # benchmarks/results/export_generate_cpu.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import torch
import transformers

from benchmarks.common import command_line, save
from nagjax.cli import main as nagjax_main
from nagjax.config import Config, apply_overrides
from nagjax.train.checkpoint import CheckpointStore
from nagjax.train.state import training_state
from nagjax.train.trainer import resolve


def random_run(workdir: Path, d_model: int, depth: int, max_len: int) -> None:
    """A NAG checkpoint with random weights (norm-lane gain near its trained size)."""
    cfg = resolve(apply_overrides(Config(), [
        "model.residual=nag", f"model.d_model={d_model}", f"model.depth={depth}",
        f"model.n_heads={max(1, d_model // 64)}", f"data.seq_len={max_len}", "train.progress_bar=false"]))
    rng = np.random.default_rng(0)

    def fill(path, a):
        if a.dtype.kind != "f":
            return np.zeros(a.shape, a.dtype)
        names = {getattr(k, "key", None) for k in path}
        centre = 6.0 if "decode_log_gain" in names else 0.0
        return (centre + 0.02 * rng.standard_normal(a.shape)).astype(a.dtype)

    state = jax.tree_util.tree_map_with_path(fill, training_state(cfg).abstract)
    store = CheckpointStore(workdir / "checkpoints")
    store.save(1, state, {}, cfg.to_dict())
    store.close()


def step_seconds(model, ids, new: int, use_cache: bool) -> list[float]:
    """Seconds of each of `new` greedy decoding calls after the prompt `ids` (prefill untimed)."""
    times = []
    with torch.no_grad():
        out = model(ids, use_cache=use_cache)
        seq = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
        for _ in range(new):
            t0 = time.perf_counter()
            if use_cache:
                out = model(seq[:, -1:], past_key_values=out.past_key_values, use_cache=True)
            else:
                out = model(seq, use_cache=False)
            times.append(time.perf_counter() - t0)
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--prefixes", default="32,512")
    p.add_argument("--new", type=int, default=32, help="generated tokens per timing")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prefixes = [int(x) for x in args.prefixes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        random_run(tmp / "run", args.d_model, args.depth, max(prefixes) + args.new + 1)
        assert nagjax_main(["export", "--workdir", str(tmp / "run"), "--out", str(tmp / "hf")]) == 0
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"), trust_remote_code=True,
                                                                  dtype=torch.float32).eval()
        vocab = model.config.vocab_size
    lines = [f"NAG export, d_model={args.d_model}, depth={args.depth}, float32, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, {args.threads} torch threads; greedy, {args.new} new "
             f"tokens per repeat; median seconds of one decoding call over {args.reps} repeats",
             "", "| prefix tokens | cached ms/token | uncached ms/token | uncached / cached |", "|---|---|---|---|"]
    rng = np.random.default_rng(1)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompts = {n: torch.as_tensor(rng.integers(2, vocab, (1, n))) for n in prefixes}
    for n, ids in prompts.items():
        with torch.no_grad():
            a = model.generate(ids, use_cache=True, **kw)
            b = model.generate(ids, use_cache=False, **kw)
        assert a.tolist() == b.tolist(), "cached and uncached greedy outputs differ"
    samples = {(n, cache): [] for n in prefixes for cache in (True, False)}
    for _ in range(args.reps):  # variants interleaved, so that other jobs' load falls on all of them
        for n in prefixes:
            for cache in (True, False):
                samples[n, cache] += step_seconds(model, prompts[n], args.new, cache)
    cached_ms = {}
    for n in prefixes:
        per = {cache: statistics.median(samples[n, cache]) for cache in (True, False)}
        best = {cache: min(samples[n, cache]) for cache in (True, False)}
        cached_ms[n] = per[True] * 1e3
        lines.append(f"| {n} | {per[True] * 1e3:.2f} (best {best[True] * 1e3:.2f}) | {per[False] * 1e3:.2f} "
                     f"(best {best[False] * 1e3:.2f}) | {per[False] / per[True]:.1f}x |")
        print(lines[-1], flush=True)
    lo, hi = min(prefixes), max(prefixes)
    lines += ["", f"cached: {cached_ms[hi] / cached_ms[lo]:.2f}x the time per token at {hi} tokens of prefix as at {lo}"]
    lines.append("")
    lines.append("generate with and without the cache: the same tokens at every prefix (checked before timing)")
    print("\n".join(lines))
    if args.save:
        save("export_generate", lines, command=command_line("export_generate.py", sys.argv[1:]))


if __name__ == "__main__":
    main()
