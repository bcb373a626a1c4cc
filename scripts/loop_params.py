"""Parameters (counted once) and training FLOPs per token (counted per executed block) of every
variant of a registered iso-FLOP sweep, e.g. `python scripts/loop_params.py loop_tiny`."""

import sys

from nagjax import flops
from nagjax.config import apply_overrides
from nagjax.model import build_model
from nagjax.model.loops import describe
from nagjax.model.transformer import count_params
from nagjax.registry import get_sweep, load_experiments


def main(name: str) -> None:
    load_experiments()
    sweep = get_sweep(name)
    base = sweep.base
    print(f"{name}: parameters and training FLOPs per token by variant (vocab {base.data.vocab_size}, "
          f"seq {base.data.seq_len})")
    print("| variant | stack | parameters | non-embedding parameters | MFLOP/token (train) |")
    print("|---|---|---:|---:|---:|")
    for v in sweep.variants:
        cfg = apply_overrides(base, [*v.overrides, f"model.vocab_size={base.data.vocab_size}"])
        model = build_model(cfg.model)
        total = count_params(model)
        embedding = cfg.model.vocab_size * cfg.model.d_model * (1 if cfg.model.tie_embeddings else 2)
        per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        print(f"| {v.name} | {describe(cfg.model)} | {total:,} | {total - embedding:,} | {per_token / 1e6:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
