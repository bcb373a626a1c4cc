"""Behaviour fingerprint: does a refactor change what nagjax computes?

Trains 11 tiny variants (Pre-LN, LNS, NAG, NAG alpha warm-up, Block AttnRes, a tapered NAG, three
Mixture-of-Depths settings, the NAG Pallas kernel in interpret mode, a pruned LNS) for 4 steps on
the embedded corpus and prints, per variant, the final validation loss, a hash of every logged
training loss, gradient norm, evaluation and per-layer statistic, and the training FLOPs per
token. Run it on two commits and compare the JSON: equal hashes mean bit-identical behaviour.

    python scripts/fingerprint.py > after.json      # ~3 minutes on 2 CPU cores
    git stash; python scripts/fingerprint.py > before.json; git stash pop
    diff before.json after.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import nagjax.model  # noqa: F401  (registers the built-in residual schemes the overrides name)
from nagjax import flops
from nagjax.config import apply_overrides
from nagjax.registry import get_experiment, load_experiments
from nagjax.train.logging import read_metrics
from nagjax.train.trainer import train

TINY = ["model.d_model=32", "model.depth=3", "model.n_heads=2", "data.seq_len=32", "data.batch_size=4",
        "train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=0",
        "train.log_every=1", "train.progress_bar=false", "optim.warmup_steps=1"]
VARIANTS = {
    "prenorm": ["model.residual=prenorm"],
    "lns": ["model.residual=lns"],
    "nag": ["model.residual=nag"],
    "nag_warmup": ["model.residual=nag", "model.nag.alpha_warmup_steps=3"],
    "attnres": ["model.residual=attnres", "model.attnres.block_size=2"],
    "taper": ["model.residual=nag", "model.taper=linear"],
    "mod25": ["model.residual=nag", "mod.rate=0.25"],
    "mod50_kvall": ["model.residual=nag", "mod.rate=0.5", "mod.kv=all"],
    "mod_mlp": ["model.residual=nag", "mod.rate=0.5", "mod.sublayers=mlp"],
    "nag_kernel": ["model.residual=nag", "model.nag.kernel=pallas"],
    "lns_pruned": ["model.residual=lns", "model.block_ids=0,2,5"],
}
LOGGED = ("train/loss", "train/grad_norm", "eval/", "layers/")


def fingerprint(name: str, overrides: list[str]) -> dict:
    cfg = apply_overrides(get_experiment("quickstart"), [*TINY, *overrides])
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
        result = train(cfg, Path(workdir))
        records = read_metrics(Path(workdir) / "logs" / "metrics.jsonl")
    keys = sorted({k for rec in records.values() for k in rec if k.startswith(LOGGED)})
    logged = [(s, k, records[s][k]) for s in sorted(records) for k in keys if k in records[s]]
    return {"val_loss": result.val_loss,
            "logged_sha256": hashlib.sha256(json.dumps(logged).encode()).hexdigest()[:16],
            "train_flops_per_token": flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)}


def main() -> int:
    load_experiments()
    out = {name: fingerprint(name, overrides) for name, overrides in VARIANTS.items()}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
