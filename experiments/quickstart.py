"""Small models on the embedded corpus that train on a laptop CPU in minutes."""

from nagjax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from nagjax.registry import experiment


def _quickstart(residual: str) -> Config:
    return Config(
        model=ModelConfig(residual=residual, d_model=128, depth=6, n_heads=4),
        data=DataConfig(seq_len=128, batch_size=8, vocab_size=4096),
        optim=OptimConfig(lr=3e-3, warmup_steps=30),
        train=TrainConfig(steps=300, eval_every=100, eval_batches=16, checkpoint_every=100),
    )


@experiment
def quickstart() -> Config:
    """Default: a 6-block NAG model (d=128) on the embedded corpus, ~2 minutes on a 2-core CPU."""
    return _quickstart("nag")


@experiment
def quickstart_prenorm() -> Config:
    """The quickstart budget with the Pre-LN baseline (for the README comparison)."""
    return _quickstart("prenorm")


@experiment
def quickstart_lns() -> Config:
    """The quickstart budget with LayerNorm Scaling (for the README comparison)."""
    return _quickstart("lns")
