"""Realistic sizes (about 125M, 350M, 1B and 7B parameters) in Pre-LN and NAG, each with a
depth-heavy variant, on three targets: one GPU, one 8-GPU host, and a TPU v5p-64 slice (32 chips).

Names: `scale_<size>[_deep]_<residual>_<target>`, e.g. `scale_1b_deep_nag_tpu` (48 blocks, d=1280).
The deep variants also come pipelined (docs/pipeline.md): `..._8gpu_stage2` (2 stages of 4 GPUs,
FSDP inside a stage) and `..._tpu_stage4` (4 stages of 8 chips, circular schedule with 2 repeats).
Check that a config fits before renting the hardware:

    nagjax compile --experiment scale_1b_deep_nag_tpu --topology v5p-64

These train on the embedded corpus only as a smoke test; point them at real token shards with
`--set data.source=DIR` (written by `nagjax data`). Steps follow ~20 tokens per parameter.
"""

from __future__ import annotations

import functools

from nagjax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig,
                           TrainConfig)
from nagjax.registry import experiment

VOCAB = 32768
SEQ_LEN = 2048

# name -> (d_model, depth, n_heads); head_dim is 64 or 128, d_ff = 8/3 d_model (rounded to 64)
SIZES = {
    "125m": (768, 12, 12),
    "125m_deep": (512, 32, 8),
    "350m": (1024, 24, 16),
    "350m_deep": (768, 48, 12),
    "1b": (2048, 18, 16),
    "1b_deep": (1280, 48, 10),
    "7b": (4096, 32, 32),
    "7b_deep": (3072, 64, 24),
}

# target -> (mesh, global batch in sequences, description)
TARGETS = {
    "1gpu": (MeshConfig(data=1), 16, "1 GPU"),
    "8gpu": (MeshConfig(data=1, fsdp=-1), 64, "8 GPUs, FSDP over all"),
    "tpu": (MeshConfig(data=1, fsdp=-1), 256, "TPU v5p-64 (32 chips), FSDP over the slice"),
    # pipelined: the same global batches, for the deep sizes (depth divides by stages x repeats)
    "8gpu_stage2": (MeshConfig(data=1, fsdp=-1, stage=2), 64, "8 GPUs, 2 pipeline stages x FSDP over 4"),
    "tpu_stage4": (MeshConfig(data=1, fsdp=-1, stage=4), 256,
                   "TPU v5p-64 (32 chips), 4 pipeline stages x FSDP over 8, 2 repeats"),
}
# target -> the pipeline schedule of a staged target: microbatches of 8 and 16 sequences
PIPELINES = {"8gpu_stage2": PipelineConfig(microbatches=8),
             "tpu_stage4": PipelineConfig(microbatches=16, repeats=2)}


def approx_params(d_model: int, depth: int) -> float:
    return 12 * d_model * d_model * depth + 2 * VOCAB * d_model


def scale_config(size: str, residual: str, target: str) -> Config:
    d, depth, heads = SIZES[size]
    mesh, batch, _ = TARGETS[target]
    n = approx_params(d, depth)
    steps = max(1000, int(20 * n / (batch * SEQ_LEN)))
    big = n > 5e8
    return Config(
        model=ModelConfig(
            residual=residual, vocab_size=VOCAB, d_model=d, depth=depth, n_heads=heads,
            remat="full" if big or target == "1gpu" else "dots",
        ),
        data=DataConfig(seq_len=SEQ_LEN, batch_size=batch),
        optim=OptimConfig(lr=3e-4 if big else 6e-4, warmup_steps=min(2000, steps // 20)),
        train=TrainConfig(steps=steps, eval_every=1000, eval_batches=16, checkpoint_every=1000,
                          keep_checkpoints=3, log_every=50),
        mesh=mesh,
        pipeline=PIPELINES.get(target, PipelineConfig()),
    )


def _register() -> None:
    for size, (d, depth, _) in SIZES.items():
        for residual, label in (("prenorm", "Pre-LN"), ("nag", "NAG")):
            for target, (_, batch, where) in TARGETS.items():
                if size.startswith("7b") and target == "1gpu":
                    continue  # 7B params + Adam state alone exceed one GPU's memory
                if target in PIPELINES and not size.endswith("_deep"):
                    continue  # pipelining is for the deep, narrow variants
                name = f"scale_{size}_{residual}_{target}"
                n = approx_params(d, depth)
                desc = (f"{label}, ~{n / 1e9:.2f}B params ({depth} blocks, d={d}), "
                        f"{where}, batch {batch}x{SEQ_LEN}")
                build = functools.partial(scale_config, size, residual, target)
                build.__module__, build.__qualname__ = __name__, name
                experiment(build, name=name, description=desc)


_register()
