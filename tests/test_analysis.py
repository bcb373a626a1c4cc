"""Depth microscope and CascadeFlow pruning on tiny trained runs: checkpoint round trip of the
index-dependent schemes (LNS, AttnRes + taper), exact pruning, healing, reports and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_RUN
from nagjax.analysis import diagnostics as diag
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
