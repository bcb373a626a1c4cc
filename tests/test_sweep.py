"""Sweeps: iso-FLOP budgets with learning-rate grids and seeds, best-LR summaries, resumability of
multi-seed sweeps, depth-sweep planning, reports."""

import dataclasses
import json

import pytest

from conftest import TINY_RUN
from nagjax import flops
from nagjax.sweep.report import build_report
from nagjax.config import Config, apply_overrides
from nagjax.registry import get_sweep, load_experiments
from nagjax.sweep import IsoFlopSweep, Variant, plan, run_sweep, summarise


def _resolve(cfg):
    return cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=4096, compute_dtype="float32"))


def test_registered_sweeps_budget_every_run_with_lr_grids_and_seeds():
    load_experiments()
    for name in ("mod_tiny", "mod_h100"):
        sweep = get_sweep(name)
        runs = plan(sweep, resolve=_resolve)
        assert {r.config.mod.rate for r in runs} >= {0.0, 0.125, 0.25, 0.375}
        assert len(sweep.lrs) >= 2 and sweep.seeds >= 2
        assert len(runs) == len(sweep.variants) * len(sweep.lrs) * sweep.seeds
        assert len({r.name for r in runs}) == len(runs)
        for r in runs:
            tokens_per_step = r.config.data.batch_size * r.config.data.seq_len
            assert abs(r.total_flops - sweep.budget_flops) <= tokens_per_step * r.flops_per_token / 2 + 1e-6 * sweep.budget_flops
            assert r.flops_per_token == flops.train_flops_per_token(r.config.model, r.config.data.seq_len, r.config.mod)
            assert r.config.optim.lr == r.lr
            assert (r.config.train.seed, r.config.data.shuffle_seed) == (sweep.base.train.seed + r.seed,
                                                                         sweep.base.data.shuffle_seed + r.seed)
        nag = sorted({r.config.mod.rate: r for r in runs if r.config.model.residual == "nag"}.values(),
                     key=lambda r: r.config.mod.rate)
        assert all(a.tokens < b.tokens for a, b in zip(nag, nag[1:]))  # skipping buys tokens


def test_depth_sweeps_plan_grids_on_one_token_budget():
    load_experiments()
    for name in ("depth_cpu", "depth_h100"):
        sweep = get_sweep(name)
        runs = sweep.plan(resolve=_resolve)
        assert len(runs) == len(sweep.variants) * len(sweep.lrs) * sweep.seeds
        for r in runs:
            assert r.tokens <= sweep.tokens < r.tokens + r.config.data.batch_size * r.config.data.seq_len
    assert get_sweep("depth_h100").variants[0][1].data.source == "data/real77"


def test_summary_reports_each_variant_at_its_best_learning_rate():
    runs = [dict(variant=v, lr=lr, seed=s, residual="nag", depth=2, mod_rate=0.0, tokens=10, flops_per_token=1.0,
                 val_loss=loss, val_bpb=loss / 2)
            for v, lr, s, loss in [("a", 1e-3, 0, 3.0), ("a", 1e-3, 1, 3.2), ("a", 2e-3, 0, 2.9), ("a", 2e-3, 1, 2.95),
                                   ("b", 1e-3, 0, 4.0), ("b", 1e-3, 1, 4.0)]]
    a, b = summarise(runs)
    assert (a["variant"], a["best_lr"], a["seeds"]) == ("a", 2e-3, 2)
    assert a["val_loss"] == pytest.approx(2.925) and a["val_loss_std"] == pytest.approx(0.0353553, rel=1e-5)
    assert a["by_lr"]["0.001"]["mean"] == pytest.approx(3.1)
    assert b["val_loss_std"] == 0.0


def test_diverged_runs_never_win_and_reports_flag_grid_edges(tmp_path):
    def run(v, lr, seed, loss, depth=2, residual="nag"):
        return dict(variant=v, lr=lr, seed=seed, residual=residual, depth=depth, mod_rate=0.0, tokens=10,
                    flops_per_token=1.0, val_loss=loss, val_bpb=loss / 2, curve=[])
    runs = [run("a", 1e-3, 0, float("nan")), run("a", 1e-3, 1, 2.0), run("a", 3e-3, 0, 2.5), run("a", 3e-3, 1, 2.7),
            run("a", 1e-2, 0, float("inf")), run("a", 1e-2, 1, 2.6), run("b", 1e-3, 0, 4.0, 4, "prenorm"),
            run("b", 1e-3, 1, 4.2, 4, "prenorm")]
    a, b = summarise(runs)
    assert a["best_lr"] == 3e-3 and a["val_loss"] == pytest.approx(2.6) and not a["best_lr_at_edge"]
    assert a["by_lr"]["0.001"]["mean"] == float("inf")  # one diverged seed: the learning rate is out
    assert b["best_lr_at_edge"] is False  # a grid of one has no edge
    results = {"kind": "depth", "tokens": 10, "seeds": 2, "variants": [a, b], "runs": runs}
    from nagjax.sweep.report import tables, write_sweep_outputs

    write_sweep_outputs(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| a | nag | 2 | 0.003 | 2.6000 ± 0.1414 |" in text and "diverged" in text  # the per-LR table
    assert (tmp_path / "loss_vs_depth.png").stat().st_size > 0
    edge = summarise([run("c", 1e-3, 0, 3.0), run("c", 3e-3, 0, 2.0)])
    assert edge[0]["best_lr_at_edge"] and "† the best learning rate is at an end" in tables(
        {"kind": "depth", "tokens": 10, "variants": edge, "runs": []})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps([{"variant": "x"}]))  # a 12d5a80 depth sweep
    with pytest.raises(ValueError, match="written by an older nagjax"):
        build_report([tmp_path / "old"], tmp_path / "page.md")


def test_multi_seed_sweep_trains_resumes_reports_and_samples(tmp_path, capsys):
    base = apply_overrides(Config(), [*TINY_RUN, "model.residual=nag", "train.eval_batches=1", "train.log_every=1"])
    sweep = IsoFlopSweep(base=base, budget_flops=3e8, evals_per_run=2, seeds=2, variants=(
        Variant("dense", lrs=(3e-3,)), Variant("mod", ("mod.rate=0.5", "mod.exempt_first_blocks=0"), lrs=(3e-3,))))
    variants = run_sweep(sweep, tmp_path / "sweep")
    assert [v["variant"] for v in variants] == ["dense", "mod"] and all(v["seeds"] == 2 for v in variants)
    assert variants[1]["tokens"] > variants[0]["tokens"]
    assert variants[0]["val_loss_std"] > 0  # two seeds: different inits and data orders
    assert 0 < variants[1]["skip_rate"] < 1 and "loss_topk" in variants[1]  # causal eval + diagnostic
    for name in ("results.json", "results.md", "loss_vs_rate.png", "loss_vs_flops.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert "| mod | nag | 0.500 |" in (tmp_path / "sweep" / "results.md").read_text()
    # finished runs are skipped on a rerun; a deleted result is recomputed by resuming its checkpoint
    (tmp_path / "sweep" / "mod" / "lr0.003-s1" / "result.json").unlink()
    capsys.readouterr()
    again = run_sweep(sweep, tmp_path / "sweep")
    out = capsys.readouterr().out
    assert out.count("done, skipping") == 3 and "resuming" in out
    assert again[1]["val_loss"] == pytest.approx(variants[1]["val_loss"])
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert results["budget_flops"] == 3e8 and len(results["runs"]) == 4
    page = build_report([tmp_path / "sweep"], tmp_path / "docs" / "results.md", notes=["GPU sweeps: pending."])
    text = page.read_text()
    assert "## sweep" in text and "| mod | nag | 0.500 |" in text and "GPU sweeps: pending." in text
    assert (tmp_path / "docs" / "results" / "sweep" / "loss_vs_rate.png").exists()
    # the trained MoD variant samples with its trained thresholds, two prompts in one batch
    from nagjax.cli import main

    capsys.readouterr()
    assert main(["sample", "--workdir", str(tmp_path / "sweep" / "mod" / "lr0.003-s0"), "-p", "It is", "-p", "The house",
                 "--max-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("It is") and "\nThe house" in out.out
    assert "thresholds: trained (r=0.5)" in out.err and "tokens/s" in out.err and "MFLOP/token" in out.err
    assert main(["sample", "--workdir", str(tmp_path / "sweep" / "mod" / "lr0.003-s0"), "-p", "x", "--mod-rate", "1.5"]) == 2
    assert "--mod-rate: expected a skip rate in [0, 1)" in capsys.readouterr().err
