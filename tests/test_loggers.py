"""`train.loggers`: TensorBoard (with the run's config as text), metrics.jsonl, and Weights &
Biases in offline mode (skipped where wandb is not installed)."""

from __future__ import annotations

import json

import pytest

from nagjax.config import Config, ConfigError, apply_overrides
from nagjax.train.logging import ScalarWriter, read_metrics

CONFIG = {"model": {"residual": "nag", "depth": 2}, "name": "t"}
INFO = {"backend": "cpu", "git_revision": "abc"}


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_and_jsonl_loggers(tmp_path):
    log = ScalarWriter(tmp_path / "a", loggers=("tensorboard", "jsonl"))
    log.log_run(CONFIG, INFO)
    log.write(1, {"train/loss": 2.5})
    log.write(2, {"train/loss": 2.0, "eval/loss/prose": 3.0})
    log.close()
    assert read_metrics(tmp_path / "a" / "metrics.jsonl") == {
        1: {"step": 1, "train/loss": 2.5}, 2: {"step": 2, "train/loss": 2.0, "eval/loss/prose": 3.0}}
    acc = _events(tmp_path / "a")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    text = acc.Tensors("run/config")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == CONFIG
    only_tb = ScalarWriter(tmp_path / "b", loggers=("tensorboard",))
    only_tb.write(1, {"x": 1.0})
    only_tb.close()
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_logger_config_errors():
    with pytest.raises(ConfigError, match=r"train.loggers: unknown logger\(s\) \['mlflow'\]"):
        apply_overrides(Config(), ["train.loggers=tensorboard,mlflow"])
    assert apply_overrides(Config(), ["train.loggers=jsonl, wandb"]).train.logger_list == ["jsonl", "wandb"]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logdir = tmp_path / "logs"
    log = ScalarWriter(logdir, loggers=("wandb", "jsonl"), run={"project": "p", "name": "t"})
    log.log_run(CONFIG, INFO)
    for step in (1, 2):
        log.write(step, {"train/loss": 3.0 - step})
    run = log._loggers[0].run
    assert run.config["model"] == CONFIG["model"] and run.config["run_info"] == INFO
    assert run.summary["train/loss"] in (1.0, 2.0)  # W&B commits a step once a later one (or finish) comes
    log.close()
    run_id = (logdir / "wandb_run_id").read_text()
    (record,) = list((logdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert record.stat().st_size > 0  # what `wandb sync` uploads later
    again = ScalarWriter(logdir, loggers=("wandb",), run={"project": "p"})  # a resumed workdir
    assert again._loggers[0].run.id == run_id
    again.close()
