"""The iso-FLOP sweep engine: budgets, resumability, outputs."""

import json

import pytest

from conftest import TINY_RUN
from nagjax import flops
from nagjax.config import Config, apply_overrides
from nagjax.registry import get_sweep, load_experiments
from nagjax.sweep import IsoFlopSweep, Variant, plan, run_sweep


def _resolve(cfg):
    import dataclasses
    return cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=4096, compute_dtype="float32"))


def test_registered_sweeps_budget_every_variant_within_one_step():
    load_experiments()
    for name in ("mod_tiny", "mod_h100"):
        sweep = get_sweep(name)
        runs = plan(sweep, resolve=_resolve)
        assert {r.config.mod.rate for r in runs} >= {0.0, 0.125, 0.25, 0.375}
        for r in runs:
            step_flops = r.tokens_per_step * r.flops_per_token
            assert abs(r.total_flops - sweep.budget_flops) <= step_flops / 2 + 1e-6 * sweep.budget_flops
            assert r.flops_per_token == flops.train_flops_per_token(r.config.model, r.config.data.seq_len, r.config.mod)
        by_rate = sorted(runs, key=lambda r: r.config.mod.rate)
        nag = [r for r in by_rate if r.config.model.residual == "nag"]
        assert all(a.tokens < b.tokens for a, b in zip(nag, nag[1:]))  # skipping buys tokens


def test_sweep_trains_resumes_and_reports(tmp_path, capsys):
    base = apply_overrides(Config(), [*TINY_RUN, "model.residual=nag", "train.eval_batches=2", "train.log_every=1"])
    sweep = IsoFlopSweep(base=base, budget_flops=4e8, evals_per_run=2, variants=(
        Variant("dense"), Variant("mod", ("mod.rate=0.5", "mod.exempt_first_blocks=0"))))
    results = run_sweep(sweep, tmp_path)
    assert [r["variant"] for r in results] == ["dense", "mod"]
    assert results[1]["tokens"] > results[0]["tokens"]
    for name in ("results.json", "results.md", "loss_vs_rate.png", "loss_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| mod | nag | 0.500 |" in (tmp_path / "results.md").read_text()
    # a finished variant is skipped on rerun; a deleted result is recomputed by resuming
    (tmp_path / "mod" / "result.json").unlink()
    capsys.readouterr()
    again = run_sweep(sweep, tmp_path)
    out = capsys.readouterr().out
    assert "dense: done, skipping" in out and "resuming" in out
    assert again[1]["val_loss"] == pytest.approx(results[1]["val_loss"])
    assert json.loads((tmp_path / "results.json").read_text())["budget_flops"] == 4e8
    # the trained MoD variant samples with its trained thresholds, two prompts in one batch
    from nagjax.cli import main

    capsys.readouterr()
    assert main(["sample", "--workdir", str(tmp_path / "mod"), "-p", "It is", "-p", "The house",
                 "--max-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("It is") and "\nThe house" in out.out
    assert "thresholds: trained (r=0.5)" in out.err and "tokens/s" in out.err and "MFLOP/token" in out.err
    assert main(["sample", "--workdir", str(tmp_path / "mod"), "-p", "x", "--mod-rate", "1.5"]) == 2
    assert "--mod-rate: expected a skip rate in [0, 1)" in capsys.readouterr().err
