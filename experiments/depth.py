"""Depth comparators: AttnRes and CascadeFormer experiments, and the depth sweeps (fixed width,
fixed token budget) over Pre-LN, LNS, NAG and Block AttnRes.

Run a depth sweep with `nagjax sweep --sweep depth_cpu --workdir DIR`.
"""

import dataclasses

from nagjax.sweep import DepthSweep
from nagjax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from nagjax.model.residual.attnres import AttnResConfig
from nagjax.registry import experiment, sweep
from nagjax_experiments.mod import REAL_CORPUS

SCHEMES = ("prenorm", "lns", "nag", "attnres")


def _quick(**model) -> Config:
    return Config(
        model=ModelConfig(d_model=128, depth=6, n_heads=4, **model),
        data=DataConfig(seq_len=128, batch_size=8, vocab_size=4096),
        optim=OptimConfig(lr=3e-3, warmup_steps=30),
        train=TrainConfig(steps=300, eval_every=100, eval_batches=16, checkpoint_every=100),
    )


def block_attnres(depth: int, n_blocks: int = 8) -> AttnResConfig:
    """Block AttnRes with about `n_blocks` source blocks (docs/methods.md §4: N ~ 8 keeps most of the gain)."""
    return AttnResConfig(block_size=max(1, (2 * depth) // n_blocks))


@experiment
def quickstart_attnres() -> Config:
    """The quickstart budget with Block AttnRes (blocks of 3 sublayers, 5 sources)."""
    return _quick(residual="attnres", options=(AttnResConfig(block_size=3),))


@experiment
def quickstart_attnres_full() -> Config:
    """The quickstart budget with Full AttnRes (every sublayer output is a source)."""
    return _quick(residual="attnres", options=(AttnResConfig(block_size=1),))


@experiment
def quickstart_cascade() -> Config:
    """The quickstart budget with a linear CascadeFormer MLP taper (NAG residual)."""
    return _quick(residual="nag", taper="linear", taper_stages=3)


def _variants(base: Config, depths) -> tuple:
    out = []
    for scheme in SCHEMES:
        for depth in depths:
            extra = {"options": (block_attnres(depth),)} if scheme == "attnres" else {}
            model = dataclasses.replace(base.model, residual=scheme, depth=depth, **extra)
            out.append((f"{scheme}_L{depth}", base.replace(model=model)))
    return tuple(out)


@sweep
def depth_cpu() -> DepthSweep:
    """Depth sweep, CPU size: 4 schemes x depth 2/4/8 at d=32, 15k tokens per run, 5 LRs x 2 seeds (a smoke test;
    60 steps favour large rates: the first run's optima all sat at the top of 1.5e-3..6e-3)."""
    base = Config(
        model=ModelConfig(d_model=32, n_heads=2, d_ff=64),
        data=DataConfig(seq_len=32, batch_size=8, vocab_size=4096),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(eval_every=0, eval_batches=4, checkpoint_every=0, log_every=20, progress_bar=False),
    )
    return DepthSweep(_variants(base, (2, 4, 8)), tokens=60 * 8 * 32, lrs=(1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2), seeds=2,
                      description=" ".join(depth_cpu.__doc__.split()))


@sweep
def depth_h100() -> DepthSweep:
    """Depth sweep, one H100: 4 schemes x depth 6/12/24/48 at d=512, 2^26 tokens per run, 3 LRs x 2 seeds."""
    base = Config(
        model=ModelConfig(d_model=512, n_heads=8, remat="dots"),
        data=DataConfig(source=REAL_CORPUS, seq_len=1024, batch_size=32),
        optim=OptimConfig(lr=2e-3, warmup_steps=200),
        train=TrainConfig(eval_every=1000, eval_batches=32, checkpoint_every=1000, log_every=50),
    )
    # 2^26 tokens = 2.5 passes over data/real77 (26M tokens)
    return DepthSweep(_variants(base, (6, 12, 24, 48)), tokens=2 ** 26, lrs=(1e-3, 2e-3, 4e-3), seeds=2,
                      description=" ".join(depth_h100.__doc__.split()))
