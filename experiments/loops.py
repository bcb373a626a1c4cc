"""Parameter-shared repetition (docs/methods.md §9): looped depth against unique depth, and NAG +
Mixture-of-Depths on a looped stack (a router-free mixture of recursions), under one FLOP counter.

Every variant of a sweep trains on the same budget of training FLOPs (iso-FLOP, methods §6), and
FLOPs count per executed block, so:

  * unique depth L vs L/R x R (R passes over L/R shared blocks): equal FLOPs per token, equal
    tokens, R times fewer block parameters;
  * unique depth L/R vs L/R x R: equal parameters; the unique model trains on ~R times the tokens.

Run with `nagjax sweep --sweep loop_tiny --workdir DIR` (CPU) or `--sweep loop_h100`.
"""

from nagjax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from nagjax.registry import experiment, sweep
from nagjax.sweep import IsoFlopSweep, Variant
from nagjax_experiments.mod import REAL_CORPUS


def _loop_variants(depth: int, repeats: tuple[int, ...], schemes=("prenorm", "nag"), orders=("cycle", "block"),
                   mod_rate: float = 0.25) -> tuple[Variant, ...]:
    """Per scheme: unique depth L, and per R: unique L/R (equal parameters to L/R x R) and L/R x R
    in each order; plus NAG + MoD at `mod_rate` on the first looped stack (cycle order)."""
    out = []
    for scheme in schemes:
        out.append(Variant(f"{scheme}_L{depth}", (f"model.residual={scheme}", f"model.depth={depth}")))
        for r in repeats:
            base = depth // r
            out.append(Variant(f"{scheme}_L{base}", (f"model.residual={scheme}", f"model.depth={base}")))
            for order in orders:
                out.append(Variant(f"{scheme}_L{base}x{r}_{order}", (
                    f"model.residual={scheme}", f"model.depth={base}", f"model.repeat={r}",
                    f"model.repeat_order={order}")))
    if "nag" in schemes and mod_rate > 0:
        r = repeats[0]
        out.append(Variant(f"nag_L{depth // r}x{r}_cycle_mod{mod_rate:g}", (
            "model.residual=nag", f"model.depth={depth // r}", f"model.repeat={r}", "model.repeat_order=cycle",
            f"mod.rate={mod_rate}")))
    # the unique depths L/R can repeat across R: keep the first of each name
    seen, unique = set(), []
    for v in out:
        if v.name not in seen:
            seen.add(v.name)
            unique.append(v)
    return tuple(unique)


@experiment
def loop_quickstart() -> Config:
    """NAG, 3 blocks run twice (cycle order), per-pass gates: 6 executed blocks on 3 blocks' weights."""
    return Config(
        model=ModelConfig(residual="nag", d_model=64, depth=3, repeat=2, n_heads=2),
        data=DataConfig(seq_len=64, batch_size=8, vocab_size=4096),
        optim=OptimConfig(lr=6e-3, warmup_steps=20),
        train=TrainConfig(steps=300, eval_every=100, eval_batches=8, log_every=10, progress_bar=False),
    )


@sweep
def loop_tiny() -> IsoFlopSweep:
    """CPU, ~40 min on 2 shared cores: Pre-LN and NAG at unique depth 4, unique depth 2 and 2 blocks x 2 passes
    (cycle and block order), plus NAG + MoD r=0.25 on the looped stack; d=64, one FLOP budget, 3 LRs x 2 seeds
    (the grid is centred on 6e-3, the best rate of every variant of mod_tiny at this width and batch)."""
    base = Config(
        model=ModelConfig(residual="nag", d_model=64, depth=4, n_heads=2),
        data=DataConfig(seq_len=64, batch_size=8, vocab_size=4096),
        optim=OptimConfig(lr=6e-3, warmup_steps=20),
        train=TrainConfig(eval_batches=8, log_every=10, progress_bar=False),
    )
    return IsoFlopSweep(base=base, budget_flops=6e11, variants=_loop_variants(4, (2,)), lrs=(3e-3, 6e-3, 1.2e-2),
                        seeds=2,
                        description="tiny CPU iso-FLOP sweep of looped vs unique depth on the embedded corpus")


@sweep
def loop_h100() -> IsoFlopSweep:
    """One H100, ~4-5 h: Pre-LN and NAG at unique depth 12, 6 and 4 and 6 x 2, 4 x 3 (cycle and block order),
    plus NAG + MoD r=0.25 on 6 x 2; d=768, seq 1024, data/real77, 3 LRs x 2 seeds."""
    base = Config(
        model=ModelConfig(residual="nag", d_model=768, depth=12, n_heads=12, remat="dots"),
        data=DataConfig(source=REAL_CORPUS, seq_len=1024, batch_size=32),
        optim=OptimConfig(lr=1.5e-3, warmup_steps=100),
        train=TrainConfig(eval_batches=16, log_every=50, keep_checkpoints=1),
    )
    return IsoFlopSweep(base=base, budget_flops=2e16, variants=_loop_variants(12, (2, 3)),
                        lrs=(7.5e-4, 1.5e-3, 3e-3), seeds=2,
                        description="one-H100 iso-FLOP sweep of looped vs unique depth on data/real77")
