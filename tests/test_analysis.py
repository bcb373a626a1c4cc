"""Depth microscope and CascadeFlow pruning on tiny trained runs: checkpoint round trip of the
index-dependent schemes (LNS, AttnRes + taper), exact pruning, healing, reports and plots; and the
census of collectives per step in optimised HLO (nagjax/analysis/hlo.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_RUN
from nagjax.analysis import diagnostics as diag
from nagjax.analysis import hlo
from nagjax.analysis import pruning
from nagjax.cli import main
from nagjax.config import Config, apply_overrides
from nagjax.train.trainer import evaluate_workdir, train

TINY = [*TINY_RUN, "model.depth=4", "train.steps=4", "train.checkpoint_every=2", "train.eval_every=0",
        "train.eval_batches=2", "train.log_every=2", "optim.warmup_steps=1"]
VARIANTS = {
    "lns": ["model.residual=lns"],
    "attnres_taper": ["model.residual=attnres", "model.attnres.block_size=3", "model.taper=linear"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in VARIANTS.items():
        workdir = tmp_path_factory.mktemp(name)
        result = train(apply_overrides(Config(name=name), TINY + extra), workdir)
        out[name] = (workdir, result)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_checkpoint_round_trip_and_exact_pruning(runs, name, tmp_path):
    workdir, result = runs[name]
    assert evaluate_workdir(workdir)["loss"] == pytest.approx(result.val_loss, rel=1e-6)
    run = diag.load_run(workdir)
    assert run.step == 4 and diag.checkpoint_steps(workdir) == [2, 4]
    batches = diag.validation_batches(run.config, 2)
    full, _, _ = diag.evaluate(run, batches)
    assert full == pytest.approx(result.val_loss, rel=1e-5)  # block-by-block == scanned forward
    # Drop block 1 by hand through the public function, then compare with skipping it.
    report = pruning.prune_workdir(workdir, 1, "magnitude", out=tmp_path / "pruned")
    dropped = report["dropped_blocks"][0]
    keep = np.ones(4)
    keep[dropped] = 0
    skipped, _, _ = diag.evaluate(run, batches, keep)
    assert report["loss_after"] == pytest.approx(skipped, rel=1e-5, abs=1e-6)
    pruned = diag.load_run(tmp_path / "pruned")
    assert pruned.config.model.depth == 3 and pruned.config.model.block_index_list == report["kept_blocks"]
    assert pruned.state["aux"]["block_grad_norm_sum"].shape == (3,)
    np.testing.assert_allclose(pruned.state["aux"]["block_grad_norm_sum"],
                               np.asarray(run.state["aux"]["block_grad_norm_sum"])[report["kept_blocks"]])


def test_prune_cli_heal_eval_train_and_report(runs, tmp_path, capsys):
    workdir, _ = runs["lns"]
    out = tmp_path / "cf"
    assert main(["prune", "--workdir", str(workdir), "--blocks", "2", "--method", "cascadeflow",
                 "--heal-steps", "2", "--out", str(out), "--json"]) == 0
    text = capsys.readouterr().out  # trainer lines of the healing run, then the JSON report
    report = json.loads(text[text.index("\n{") + 1:])
    scores = report["scores"]
    assert sorted(report["dropped_blocks"]) == sorted(np.argsort(scores)[:2].tolist())
    assert np.isfinite(report["loss_after_heal"])
    assert main(["eval", "--workdir", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6
    # `nagjax train` continues the saved (pruned) config when no --experiment is given.
    assert main(["train", "--workdir", str(out), "--set", "train.steps=7"]) == 0
    assert diag.checkpoint_steps(out)[-1] == 7

    rep = pruning.prune_report(workdir, eval_batches=1)
    assert set(rep["methods"]) == set(pruning.METHODS) and len(rep["skip_loss"]) == 4
    assert rep["stability_against"]["step"] == 2
    assert all(-1 <= r["spearman_stability"] <= 1 for r in rep["methods"].values()
               if np.isfinite(r["spearman_stability"]))
    assert "stability" in pruning.format_report(rep)


def test_spearman_and_ranking():
    assert pruning.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pruning.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pruning.ranking([0.5, 0.1, 0.3]) == [1, 2, 0]


def test_analyze_overlays_two_runs(runs, tmp_path, capsys):
    a, _ = runs["lns"]
    b, _ = runs["attnres_taper"]
    assert main(["analyze", "--workdir", str(a), "--compare", str(b), "--out", str(tmp_path),
                 "--batches", "1"]) == 0
    data = json.loads((tmp_path / "depth.json").read_text())
    assert [r["residual"] for r in data["runs"]] == ["lns", "attnres"]
    for r in data["runs"]:
        assert np.asarray(r["sublayers"]["stream_rms"]).shape == (4, 2)
        assert len(r["blocks"]["skip_loss_increase"]) == 4
    w = np.asarray(data["runs"][1]["sublayers"]["mix_weights"])  # [depth, 2, N]
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert {"stream_rms.png", "update_ratio.png", "cosine.png", "grad_norm_sum.png",
            "skip_loss_increase.png", "mix_weights_attnres_taper.png"} <= pngs


# Compiled on 4 forced CPU devices in a child process (this one keeps a single device): a ring
# ppermute of each device's f32[8, 8] block (256 bytes) 5 times in a loop, then a psum and an
# all_gather (f32[4, 8, 8]: 1024 bytes). Prints the optimised HLO.
SHARD_MAP_CHILD = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P

mesh = Mesh(np.array(jax.devices()), ("x",))
ring = [(i, (i + 1) % 4) for i in range(4)]

def step(x):
    x = jax.lax.fori_loop(0, 5, lambda _, c: jax.lax.ppermute(c, "x", ring) * 1.5, x)
    return x + jax.lax.psum(x, "x"), jax.lax.all_gather(x, "x")

f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P("x"))))
print(f.lower(jnp.ones((32, 8), jnp.float32)).compile().as_text())
"""


def test_collectives_of_a_compiled_shard_map_weight_the_loop_by_its_trip_count():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SHARD_MAP_CHILD], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout
    assert 5 in hlo.executions(hlo.parse(text)).values()  # the loop stayed a while of 5 trips
    census = hlo.collectives(text)
    assert census["collective-permute"] == {"count": 5, "bytes": 5 * 8 * 8 * 4}
    assert census["all-reduce"] == {"count": 1, "bytes": 8 * 8 * 4}
    assert census["all-gather"] == {"count": 1, "bytes": 4 * 8 * 8 * 4}
    assert census["reduce-scatter"]["count"] == census["all-to-all"]["count"] == 0


# GPU-style async collectives as XLA prints them: native -start/-done pairs, a reduce-scatter
# wrapped in an async computation, the sugared all-to-all-start, plus an all-reduce in a
# conditional branch. The wrapped computation is not executed on its own: counted once, via its start.
ASYNC_HLO = """
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%wrapped_reduce_scatter (p: f32[64]) -> f32[16] {
  %p = f32[64]{0} parameter(0)
  ROOT %rs = f32[16]{0} reduce-scatter(%p), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

%body (loop: (s32[], f32[256])) -> (s32[], f32[256]) {
  %loop = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%loop), index=0
  %x = f32[256]{0} get-tuple-element(%loop), index=1
  %cp-start = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%x), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cp-done = f32[256]{0} collective-permute-done(%cp-start)
  ROOT %next = (s32[], f32[256]{0}) tuple(%i, %cp-done)
}

%cond (loop.1: (s32[], f32[256])) -> pred[] {
  %loop.1 = (s32[], f32[256]{0}) parameter(0)
  ROOT %go = pred[] constant(true)
}

%branch (y: f32[8]) -> f32[8] {
  %y = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%y), replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (x.1: f32[256], g: f32[64], k: s32[]) -> (f32[256], f32[16]) {
  %x.1 = f32[256]{0} parameter(0)
  %g = f32[64]{0} parameter(1)
  %k = s32[] parameter(2)
  %init = (s32[], f32[256]{0}) tuple(%k, %x.1)
  %while = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag-start = (f32[64]{0}, f32[256]{0}) all-gather-start(%g), replica_groups={{0,1,2,3}}, dimensions={0}
  %ag-done = f32[256]{0} all-gather-done(%ag-start)
  %ar-start = f32[64]{0} all-reduce-start(%g), replica_groups={{0,1,2,3}}, to_apply=%add
  %ar-done = f32[64]{0} all-reduce-done(%ar-start)
  %rs-start = ((f32[64]{0}), f32[16]{0}, u32[]) async-start(%g), calls=%wrapped_reduce_scatter
  %rs-done = f32[16]{0} async-done(%rs-start), calls=%wrapped_reduce_scatter
  %a2a-start = ((f32[64]{0}), f32[64]{0}) all-to-all-start(%g), replica_groups={{0,1,2,3}}, dimensions={0}
  %a2a-done = f32[64]{0} all-to-all-done(%a2a-start)
  %slice = f32[8]{0} slice(%g), slice={[0:8]}
  %branched = f32[8]{0} conditional(%k, %slice), branch_computations={%branch}
  ROOT %out = (f32[256]{0}, f32[16]{0}) tuple(%ag-done, %rs-done)
}
"""


def test_collectives_count_async_starts_once_with_their_result_bytes():
    assert hlo.collectives(ASYNC_HLO) == {
        "collective-permute": {"count": 3, "bytes": 3 * 256 * 4},  # 3 trips x the f32[256] result
        "all-gather": {"count": 1, "bytes": 256 * 4},
        "all-reduce": {"count": 2, "bytes": 64 * 4 + 8 * 4},  # the start's own shape + the branch's
        "reduce-scatter": {"count": 1, "bytes": 16 * 4},
        "all-to-all": {"count": 1, "bytes": 64 * 4},
    }


def test_format_collectives_lists_only_the_kinds_that_run():
    census = {kind: {"count": 0, "bytes": 0} for kind in hlo.COLLECTIVES}
    assert hlo.format_collectives(census) == "collectives per step: none"
    census["collective-permute"] = {"count": 24, "bytes": 12 * 2**20}
    census["all-gather"] = {"count": 130, "bytes": 1234.5 * 2**20}
    assert hlo.format_collectives(census) == \
        "collectives per step: collective-permute 24 (12.0 MiB), all-gather 130 (1,234.5 MiB)"
