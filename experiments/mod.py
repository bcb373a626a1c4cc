"""Mixture-of-Depths on NAG and its iso-FLOP sweeps (docs/methods.md §2, §6)."""

from nagjax.config import Config, DataConfig, ModConfig, ModelConfig, OptimConfig, TrainConfig
from nagjax.registry import experiment, sweep
from nagjax.sweep import IsoFlopSweep, Variant

RATES = (0.125, 0.25, 0.375)
# The GPU sweeps' corpus: ~77 MB of dictionary, technical docs and plays (26M tokens), built by
# `python scripts/build_real_corpus.py data/real77` (run from the folder you train in).
REAL_CORPUS = "data/real77"


def _variants() -> tuple[Variant, ...]:
    return (
        Variant("prenorm_dense", ("model.residual=prenorm",)),
        Variant("nag_dense", ("model.residual=nag",)),
        *(Variant(f"nag_mod_{r:g}", ("model.residual=nag", f"mod.rate={r}")) for r in RATES),
    )


def _tiny() -> Config:
    return Config(
        model=ModelConfig(residual="nag", d_model=64, depth=6, n_heads=2),
        data=DataConfig(seq_len=64, batch_size=8, vocab_size=4096),
        optim=OptimConfig(lr=3e-3, warmup_steps=20),
        train=TrainConfig(eval_batches=8, log_every=10, progress_bar=False),
    )


@experiment
def mod_quickstart() -> Config:
    """Quickstart-sized NAG with Mixture-of-Depths at r=0.25 (all sublayers but the first block)."""
    cfg = _tiny()
    return cfg.replace(mod=ModConfig(rate=0.25), train=TrainConfig(steps=300, eval_every=100))


@sweep
def mod_tiny() -> IsoFlopSweep:
    """CPU, ~40 min: Pre-LN, NAG, NAG+MoD r=0.125/0.25/0.375 at one FLOP budget, 4 LRs x 2 seeds (d=64).
    (The first run's best rates all sat at the top of 1.5e-3..6e-3, so the grid goes on to 1.2e-2.)"""
    return IsoFlopSweep(base=_tiny(), budget_flops=1.5e12, variants=_variants(), lrs=(1.5e-3, 3e-3, 6e-3, 1.2e-2),
                        seeds=2, description="tiny CPU iso-FLOP MoD sweep on the embedded corpus")


@sweep
def mod_h100() -> IsoFlopSweep:
    """One H100, ~2 h: 12 blocks, d=768, seq 1024, the same five variants, 3 LRs x 2 seeds, data/real77."""
    base = Config(
        model=ModelConfig(residual="nag", d_model=768, depth=12, n_heads=12, remat="dots"),
        data=DataConfig(source=REAL_CORPUS, seq_len=1024, batch_size=32),
        optim=OptimConfig(lr=1.5e-3, warmup_steps=100),
        train=TrainConfig(eval_batches=16, log_every=50, keep_checkpoints=1),
        mod=ModConfig(kept_multiple=128),
    )
    return IsoFlopSweep(base=base, budget_flops=6e16, variants=_variants(), lrs=(7.5e-4, 1.5e-3, 3e-3), seeds=2,
                        description="one-H100 iso-FLOP MoD sweep on data/real77 (~100M tokens per run, "
                                    "~4 minutes per run at ~40% MFU)")
