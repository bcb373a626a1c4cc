"""Sharded training: logical-axis rules against golden tables, equal losses on every mesh (pipeline
stages included), checkpoints that restore onto another mesh, device count or stage count, exact
resume of a SIGKILLed pipelined run, and a real 2-process run.

The multi-device checks run in subprocesses with forced host devices (the rest of the suite keeps
one device in this process): `sharding_child.py` (8 devices in one process) and
`launch/local.py` (2 processes x 4 devices, jax.distributed over gloo).

Golden tables: tests/golden/sharding/<case>.txt hold the sharding of every parameter for a few
configs and meshes, so a change that silently replicates (or re-shards) a weight fails. After an
intended change, regenerate them and review the diff:

    NAGJAX_REGEN_GOLDEN=1 pytest tests/test_sharding.py -k golden
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from conftest import TINY_RUN
from nagjax import sharding
from nagjax.config import ConfigError, MeshConfig, apply_overrides
from nagjax.model import build_model
from nagjax.registry import get_experiment, load_experiments

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "sharding"
TINY = [*TINY_RUN[:4], "model.vocab_size=4096", "data.batch_size=8"]

# case -> (experiment, overrides, number of devices)
GOLDEN_CASES = {
    "tiny_prenorm_2x2x2": ("quickstart_prenorm", [*TINY, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    "tiny_lns_1x8x1": ("quickstart_lns", [*TINY, "mesh.data=1", "mesh.fsdp=8"], 8),
    "tiny_nag_2x2x2": ("quickstart", [*TINY, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    "scale_1b_deep_nag_tpu_v5p64": ("scale_1b_deep_nag_tpu", [], 32),
    "scale_7b_prenorm_tpu_2slices_tp4": (
        "scale_7b_prenorm_tpu", ["mesh.dcn_data=2", "mesh.fsdp=-1", "mesh.tensor=4"], 64),
    "scale_350m_nag_8gpu": ("scale_350m_nag_8gpu", [], 8),
    # pipeline stages: every stacked block weight splits its `layers` axis over `stage`
    "tiny_nag_stage2x2x2": ("quickstart", [*TINY, "mesh.stage=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    "scale_7b_deep_nag_tpu_stage4": ("scale_7b_deep_nag_tpu_stage4", [], 32),
}


def golden_table(experiment: str, overrides: list[str], n_devices: int) -> str:
    load_experiments()
    cfg = apply_overrides(get_experiment(experiment), overrides)
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, n_devices)))
    params = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model)), nnx.Param)[1]
    rows = sharding.sharding_table(params, mesh)
    lines = [f"# {experiment} {' '.join(overrides)} on {n_devices} devices: mesh {mesh}"]
    lines += [f"{name} {list(shape)} {','.join(axes) or '-'} {spec}" for name, shape, axes, spec in rows]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_parameter_shardings(case):
    table = golden_table(*GOLDEN_CASES[case])
    path = GOLDEN / f"{case}.txt"
    if os.environ.get("NAGJAX_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
    assert path.exists(), f"missing {path}; run NAGJAX_REGEN_GOLDEN=1 pytest tests/test_sharding.py -k golden"
    assert table == path.read_text(), (
        f"parameter shardings of {case} differ from {path}; if intended, regenerate with "
        "NAGJAX_REGEN_GOLDEN=1 pytest tests/test_sharding.py -k golden and review the diff")


def test_big_weights_are_sharded_and_optimizer_state_follows():
    """Every matrix is split over fsdp (and tensor where it has heads/mlp/vocab); Adam moments get
    the same sharding as their parameter; counts and other leaves are replicated."""
    load_experiments()
    cfg = apply_overrides(get_experiment("quickstart"), [*TINY, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = {"dcn": 1, "stage": 1, "data": 2, "fsdp": 2, "tensor": 2}
    from nagjax.train import optim

    params = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model)), nnx.Param)[1]
    opt = optim.make_optimizer(cfg.optim, 10, params)
    state = jax.eval_shape(lambda: {"params": params, "opt_state": opt.init(params)})
    specs = sharding.tree_specs(state, mesh)
    for name, shape, axes, spec in sharding.sharding_table(params, mesh):
        if len(shape) >= 2 and shape[-1] >= 32 and "sublayer" not in axes:
            assert "fsdp" in spec, (name, spec)
        if {"heads", "mlp", "vocab"} & set(axes):
            assert "tensor" in spec, (name, spec)
    param_specs = jax.tree.leaves(specs["params"])
    groups = specs["opt_state"][1].inner_states
    mu = [jax.tree.leaves(groups[g].inner_state[0].mu) for g in groups]
    assert sorted(map(str, param_specs)) == sorted(map(str, sum(mu, [])))


def test_mesh_shapes_and_unknown_axes():
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (1, 1, 2, 2, 2)
    assert sharding.mesh_shape(MeshConfig(data=1, fsdp=-1, dcn_data=2), 64) == (2, 1, 1, 32, 1)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, stage=2), 8) == (1, 2, 2, 2, 1)
    with pytest.raises(ConfigError, match="devices"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=1), 8)
    with pytest.raises(ConfigError, match="mesh.stage=3"):
        sharding.mesh_shape(MeshConfig(stage=3), 8)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec((4, 4), ("embed", "new_axis"), {"fsdp": 2})
    # not divisible -> that dimension stays whole (recorded in the golden tables)
    assert sharding.logical_to_spec((3, 8), ("kv_heads", "embed"), {"tensor": 2, "fsdp": 2}) == \
        jax.sharding.PartitionSpec(None, "fsdp")


def test_constrain_is_a_noop_outside_a_mesh():
    x = jax.numpy.ones((2, 3, 4))
    assert sharding.constrain_stream({"x": x})["x"] is x


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "sharding_child.py"), str(root)],
                          env=_env(8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["partitioner_warnings"] = [l for l in proc.stderr.splitlines() if "Involuntary full rematerialization" in l]
    result["start_lines"] = [l for l in proc.stdout.splitlines() if l.startswith("[nagjax] mesh ")]
    return result


def test_partitioner_never_replicates_to_reshard(eight_devices):
    """XLA warns when it must replicate a tensor to change its sharding (e.g. an embedding gather
    on an fsdp-split feature axis); none of the meshes above may trigger it."""
    assert eight_devices["partitioner_warnings"] == []


@pytest.mark.parametrize("residual", ["prenorm", "nag"])
@pytest.mark.parametrize("mesh", ["8,1,1", "2,4,1", "2,2,2"])
def test_losses_match_single_device(eight_devices, residual, mesh):
    assert eight_devices["devices"] == 8
    runs = eight_devices["losses"][residual]
    assert len(runs["1"]) == 3
    assert runs[mesh] == pytest.approx(runs["1"], rel=2e-6, abs=0)


def test_mixture_of_depths_matches_single_device_when_sharded(eight_devices):
    runs = eight_devices["losses"]["nag_mod"]
    assert len(runs["1"]) == 3 and runs["1"] != eight_devices["losses"]["nag"]["1"]  # it skips
    assert runs["2,2,2"] == pytest.approx(runs["1"], rel=2e-6, abs=0)


def test_accumulation_and_chunked_loss_shard_like_the_plain_step(eight_devices):
    runs = eight_devices["losses"]["nag_levers"]
    assert runs["2,2,2"] == pytest.approx(runs["1"], rel=2e-6, abs=0)
    assert runs["1"] == pytest.approx(eight_devices["losses"]["nag"]["1"], rel=2e-5)  # the same function


def test_a_looped_stack_shards_like_one_device(eight_devices):
    runs = eight_devices["losses"]["nag_loop"]
    assert len(runs["1"]) == 3 and runs["1"] != eight_devices["losses"]["nag_mod"]["1"]
    assert runs["2,2,2"] == pytest.approx(runs["1"], rel=2e-6, abs=0)


def test_pallas_update_runs_per_batch_shard(eight_devices):
    """The kernel (MoD r=0.5, remat=full) trains like the reference update of the same MoD model,
    and the same on a (2,2,2) mesh as on one device."""
    runs = eight_devices["losses"]["nag_kernel"]
    assert runs["1"] == pytest.approx(eight_devices["losses"]["nag_mod"]["1"], rel=2e-5)
    assert runs["2,2,2"] == pytest.approx(runs["1"], rel=2e-6, abs=0)


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("mesh", ["s2-2,2,1", "s4-2,1,1"])
def test_pipelined_training_matches_single_device(eight_devices, mesh):
    """NAG, 8 blocks, 2 pieces per stage (circular schedule), grad_accum 2, trained by the Trainer
    on (stage 2, data 2, fsdp 2) and (stage 4, data 2): the 1-device losses of every step. Measured
    when written: at most 1.0e-7 relative (a last-bit difference; some steps equal to the bit)."""
    runs = eight_devices["losses"]["nag_pipe"]
    assert len(runs["1"]) == 4 and runs["1"][-1] < runs["1"][0]
    assert runs[mesh] == pytest.approx(runs["1"], rel=2e-6, abs=0), (
        f"stage mesh {mesh} vs 1 device: max relative difference {_max_rel_diff(runs[mesh], runs['1']):.2e}")
    stages = mesh[1]
    layout = eight_devices["layouts"][f"nag_pipe/{mesh}"]
    assert f"mesh stage={stages}, data=2" in layout and f"pipeline {stages} stages x 2 repeats" in layout
    assert "bubble" in layout and f"[nagjax] {layout}" in eight_devices["start_lines"]  # the line run() prints


@pytest.mark.parametrize("target", ["pipe-s1", "pipe-s2"])
def test_a_stage4_checkpoint_restores_on_other_stage_counts(eight_devices, target):
    """The stage=4 run's checkpoint of step 3 (block weights in block order, the layers axis split
    over 4 stages), restored on 1 device (no stages) and on stage=2: the same parameters both ways;
    the step after it has the loss of the uninterrupted stage=4 run's step 4 (measured when written:
    equal to the bit on both), and its update (restored Adam moments) that run's parameters
    (measured: 4.2e-7 on 1 device, 9.3e-7 on stage=2, relative to each array's largest entry)."""
    out = eight_devices["reshard"][target]
    uninterrupted = eight_devices["losses"]["nag_pipe"]["s4-2,1,1"]
    assert out["resumed_at"] == 3 and list(out["logged"]) == ["4"]  # only the step it computed
    assert out["params_identical_to_first_restore"]
    assert any("stage" in spec for spec in out["specs"]) == (target == "pipe-s2")
    assert out["mesh"]["stage"] == (2 if target == "pipe-s2" else 1)
    loss = out["logged"]["4"]
    assert loss == pytest.approx(uninterrupted[3], rel=2e-6, abs=0), (
        f"{target}: step 4 after restoring the stage=4 checkpoint {loss!r} vs uninterrupted {uninterrupted[3]!r}: "
        f"relative difference {abs(loss - uninterrupted[3]) / abs(uninterrupted[3]):.2e}")
    assert out["final_params_rel_diff"] <= 1e-5, (
        f"{target}: parameters after the step vs the uninterrupted run's: {out['final_params_rel_diff']:.2e} "
        "of an array's largest entry (4.2e-7 on 1 device, 9.3e-7 on stage=2 when written)")


def test_sigkill_then_resume_on_a_pipelined_mesh_is_bit_exact(eight_devices):
    """`nagjax train` of the stage=2 run (stage 2, data 2, fsdp 2), SIGKILLed once it has logged
    its last step (4) before saving it, resumes from its step-2 checkpoint and redoes steps 3 and
    4: every loss, before the kill and after the resume, equal to the bit to the uninterrupted
    in-process run of the same config on the same mesh."""
    out = eight_devices["sigkill"]
    assert out["killed_rc"] == -signal.SIGKILL, out["killed_stderr"]
    assert out["committed"] == [2]
    assert out["resumed_rc"] == 0, out["resumed_stderr"]
    assert out["resumed_line"].endswith("at step 2/4")
    assert out["logged_steps"] == [1, 2, 3, 4, 3, 4]  # steps 3 and 4 computed again after the restore
    uninterrupted = {str(step): loss for step, loss in enumerate(eight_devices["losses"]["nag_pipe"]["s2-2,2,1"], 1)}
    assert out["before"] == uninterrupted
    assert out["after"] == uninterrupted


@pytest.mark.parametrize("target", ["8,1,1", "1"])
def test_checkpoint_restores_onto_another_mesh(eight_devices, target):
    saved_on = eight_devices["losses"]["nag"]["2,2,2"]
    out = eight_devices["reshard"][target]
    assert out["resumed_at"] == len(saved_on)
    assert out["params_identical"]
    other = eight_devices["reshard"]["1" if target != "1" else "8,1,1"]
    assert out["next_loss"] == pytest.approx(other["next_loss"], rel=2e-6, abs=0)


def test_two_process_launcher_matches_one_process(eight_devices, tmp_path):
    workdir = tmp_path / "mp"
    overrides = [*TINY_RUN, "data.batch_size=8", "model.residual=nag", "train.steps=3", "train.eval_every=0",
                 "train.eval_batches=1", "train.checkpoint_every=0", "train.log_every=1",
                 "optim.warmup_steps=1", "mesh.data=2", "mesh.fsdp=4"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--devices-per-process", "4",
         "--", "train", "--workdir", str(workdir), "--set", *overrides],
        env=_env(1), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    run_info = json.loads((workdir / "run_info.json").read_text())
    assert run_info["process_count"] == 2 and run_info["device_count"] == 8
    from nagjax.train.logging import read_metrics

    records = read_metrics(workdir / "logs" / "metrics.jsonl")
    losses = [records[s]["train/loss"] for s in sorted(records) if "train/loss" in records[s]]
    assert losses == pytest.approx(eight_devices["losses"]["nag"]["2,4,1"], rel=2e-6, abs=0)
    assert (workdir / "checkpoints" / "3").is_dir()


def test_compile_topology_errors_are_clear():
    from nagjax.compile import TopologyError, resolve_target

    with pytest.raises(TopologyError, match="Available: local"):
        resolve_target("not-a-topology")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        with pytest.raises(TopologyError, match="need libtpu"):
            resolve_target("v5p-64")
    else:
        assert len(resolve_target("v5p-64").devices) == 32


def test_compile_report_on_this_machine():
    """`nagjax compile --topology local`: memory, the layer loop's data movement, shardings."""
    from nagjax.compile import compile_report
    from nagjax.config import Config

    report = compile_report(apply_overrides(Config(name="tiny"), [*TINY_RUN, "model.vocab_size=97"]),
                             "local")
    for part in ("per-device memory:", "activations + temporaries", "parameter shardings", "blocks.attn.wq"):
        assert part in report
    movement = report.split("data movement around the layer loop")[1].splitlines()[1]
    assert "stacked write" in movement and "while loops 0" not in movement
