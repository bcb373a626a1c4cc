"""Pipeline parallelism (nagjax/model/pipeline.py, docs/pipeline.md).

On 8 forced CPU devices (tests/pipeline_child.py, one subprocess): the loss and gradients of one
batch on pipelined meshes equal one device's for Pre-LN, NAG, NAG + Mixture-of-Depths and Block
AttnRes, across stage counts, the circular schedule, its delay line and data/fsdp/tensor axes;
a pipelined step moves its microbatches by collective-permutes (an unpipelined one has none), and
Block AttnRes's cross-stage cache sends fewer bytes than the whole buffer. The full matrix of
schemes x layouts is `python benchmarks/pipeline_equivalence.py` (its output is committed).
Schedules, start-up errors and the cache's windows are checked here in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nagjax.config import ConfigError, ModelConfig, PipelineConfig
from nagjax.model import pipeline
from nagjax.model.residual.attnres import AttnResCrossStage

HERE = Path(__file__).parent
# float32 tolerances: the pipelined step runs the same ops per microbatch, in another order
LOSS_TOL = 1e-5
GRAD_TOL = 2e-5  # relative to the largest gradient entry


def _child(*cases: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(HERE / "pipeline_child.py"), *cases], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


CENSUS = ("census:prenorm:mesh.stage=1",
          "census:attnres_block:mesh.stage=2,pipeline.repeats=4,model.depth=8",
          "census:attnres_block:mesh.stage=2,pipeline.repeats=4,model.depth=8,pipeline.cross_stage_cache=false")


@pytest.fixture(scope="module")
def eight_devices():
    from pipeline_child import DEFAULT

    return _child(*DEFAULT, *CENSUS)


def _assert_matches(case: str, result: dict):
    assert result["loss_diff"] <= LOSS_TOL * abs(result["loss"]), (case, result)
    assert result["grad_diff"] <= GRAD_TOL * result["grad_scale"], (case, result)


def test_pipelined_loss_and_gradients_match_one_device(eight_devices):
    from pipeline_child import DEFAULT

    for case in DEFAULT:
        result = eight_devices[case]
        _assert_matches(case, result)
        # the microbatches moved: one ring hop per iteration forward and backward, or more
        assert result["collectives"]["collective-permute"]["count"] >= 2 * result["iterations"], (case, result)


def test_a_pipelined_step_moves_microbatches_by_collective_permutes(eight_devices):
    flat = eight_devices["census:prenorm:mesh.stage=1"]["collective-permute"]
    staged = eight_devices["prenorm:stage4"]["collectives"]["collective-permute"]
    assert flat["count"] == 0
    sched = pipeline.Schedule(stages=4, repeats=1, microbatches=4, positions=4)
    # a device's part of a microbatch's stream: 4 sequences over 2 data devices x 32 tokens x d=32
    # float32, one hop per iteration forward and one backward
    hop = 2 * 32 * 32 * 4
    assert staged["count"] >= 2 * sched.iterations and staged["bytes"] >= 2 * sched.iterations * hop


def test_attnres_cache_sends_only_the_new_block_summaries(eight_devices):
    cached = eight_devices[CENSUS[1]]["collective-permute"]["bytes"]
    whole = eight_devices[CENSUS[2]]["collective-permute"]["bytes"]
    # 9 source slots; a hop of the cached schedule carries a window of 2 (plus `filled`)
    assert cached < 0.5 * whole, (cached, whole)


def test_schedule_numbers():
    sched = pipeline.Schedule(stages=4, repeats=2, microbatches=8, positions=64)
    assert (sched.per_piece, sched.iterations, sched.delay) == (8, 19, 4)
    assert sched.bubble == pytest.approx(3 / 19)
    assert "bubble 15.8%" in sched.describe()


def test_configs_that_cannot_pipeline_fail_naming_the_key():
    cfg = ModelConfig(depth=6, vocab_size=64)
    with pytest.raises(ConfigError, match="model.depth=6 .* 4 x 1"):
        pipeline.schedule(cfg, PipelineConfig(), 4)
    with pytest.raises(ConfigError, match="pipeline.microbatches=2 must be >= mesh.stage=3"):
        pipeline.schedule(cfg, PipelineConfig(microbatches=2), 3)
    with pytest.raises(ConfigError, match="model.taper"):
        pipeline.schedule(ModelConfig(depth=4, vocab_size=64, taper="linear"), PipelineConfig(), 2)


def test_a_run_that_cannot_pipeline_stops_before_touching_its_workdir(tmp_path):
    from conftest import TINY_RUN
    from nagjax.config import apply_overrides
    from nagjax.registry import get_experiment, load_experiments
    from nagjax.train.trainer import Trainer

    load_experiments()
    cfg = apply_overrides(get_experiment("quickstart"), [*TINY_RUN, "model.depth=3", "mesh.stage=2"])
    with pytest.raises(ConfigError, match="model.depth=3 does not split into mesh.stage x pipeline.repeats"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_attnres_windows_cover_what_the_receiver_lacks():
    """Simulate the buffer a stage holds per microbatch: after every hop it equals the sender's."""
    from nagjax.config import apply_overrides
    from nagjax.registry import get_experiment, load_experiments

    load_experiments()
    for size, stages, repeats, depth in ((1, 2, 2, 4), (2, 2, 4, 8), (3, 4, 2, 8), (2, 4, 1, 8)):
        cfg = apply_overrides(get_experiment("quickstart"), [
            "model.residual=attnres", f"model.attnres.block_size={size}", f"model.depth={depth}"]).model
        sched = pipeline.Schedule(stages, repeats, stages, depth)
        cross = AttnResCrossStage(cfg, sched)
        n, k = cross.sources, sched.per_piece
        truth = [0] * n  # writes into each slot so far (slot 0: the embedding)
        truth[0] = 1
        held = {s: [0] * n for s in range(stages)}
        for q in range(sched.pieces):
            stage = q % stages
            base = cross.bases[q]
            view = list(held[stage])
            view[base:base + cross.width] = truth[base:base + cross.width]
            assert view == truth, (size, stages, repeats, q)
            for sub in range(2 * q * k, 2 * (q + 1) * k):
                truth[1 + sub // size] += 1
            held[stage] = list(truth)
        assert cross.width < n or repeats == 1
