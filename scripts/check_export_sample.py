"""Does an export generate what `nagjax sample --temperature 0` generates? (needs torch + transformers)

    python scripts/check_export_sample.py WORKDIR EXPORT [--prompt TEXT ...] [--max-tokens N]

Runs `nagjax sample` on WORKDIR (greedy; trained MoD thresholds, really skipping, for a run that
trained with MoD) and greedy `generate` of the export (EOS-prefixed prompt, as nagjax sample does,
one prompt at a time), and prints whether the continuations are equal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from nagjax.analysis.diagnostics import load_run, validation_batches
from nagjax.data.mixture import run_tokenizer
from nagjax.infer.sample import generate
from nagjax.model.residual.base import StepContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("export")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    prompts = args.prompt or ["It is a truth universally acknowledged", "And the LORD said unto Moses"]
    cmd = [sys.executable, "-m", "nagjax.cli", "sample", "--workdir", args.workdir, "--temperature", "0",
           "--max-tokens", str(args.max_tokens)] + [a for q in prompts for a in ("--prompt", q)]
    sample = subprocess.run(cmd, capture_output=True, text=True, check=True)
    print("$ nagjax sample --workdir", args.workdir, "--temperature 0 --max-tokens", args.max_tokens,
          " ".join(f"--prompt {q!r}" for q in prompts))
    print(sample.stdout.rstrip())
    print("\n".join(line for line in sample.stderr.splitlines() if line.startswith("[nagjax]")))
    run = load_run(args.workdir)
    tokenizer = run_tokenizer(run.config.data, args.workdir)
    policy = run.model().mod_policy
    tau, source = policy.sample_thresholds(run.state["aux"])
    model = transformers.AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    equal = True
    for q in prompts:
        ours = generate(run, tokenizer, [q], max_new_tokens=args.max_tokens, temperature=0.0, thresholds=tau)
        ids = torch.tensor([[tokenizer.eos_id] + tokenizer.encode(q)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        same = out == ours.tokens[0]
        equal &= same
        print(f"prompt {q!r}: export generate == nagjax sample: {same} ({len(out)} tokens)")
        print(f"  export: {tokenizer.decode(out[:-1] if out and out[-1] == tokenizer.eos_id else out)!r}")
    print(f"nagjax thresholds: {source}; export mod_skipping={getattr(model.config, 'mod_skipping', False)}")
    # logits on validation text against nagjax's causal evaluation (trained thresholds for a MoD run)
    tokens = validation_batches(run.config, 1)[0]["inputs"][:2]
    routing = policy.eval_routing(run.state["aux"])
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(run.graphdef, p)(t, ctx=StepContext(routing=routing))[0])(
        run.params, tokens))
    for skipping in ((True, False) if getattr(model.config, "mod_skipping", False) else (False,)):
        model.config.mod_skipping = skipping
        with torch.no_grad():
            theirs = model(torch.as_tensor(tokens)).logits.numpy()
        print(f"export (mod_skipping={skipping}) vs nagjax causal evaluation, 2 x {tokens.shape[1]} validation "
              f"tokens: max |logit difference| = {np.abs(theirs - ours).max():.3g}")
    print("EQUAL" if equal else "DIFFERENT")


if __name__ == "__main__":
    main()
