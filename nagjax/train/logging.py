"""Run logs: scalars to the loggers of `train.loggers`, and per-sublayer stats flattened into tags.

Loggers (comma-separated; default "tensorboard,jsonl"):

* `tensorboard`: event files in WORKDIR/logs (written without TensorFlow); the resolved config and
  run info as text summaries, once, when a run starts.
* `jsonl`: WORKDIR/logs/metrics.jsonl, one JSON object per logged step. Tests, `nagjax sweep` and
  `read_metrics` read this file: leave it in the list unless nothing needs it.
* `wandb`: Weights & Biases (`pip install 'nagjax[wandb]'`), project `train.wandb_project`, the
  resolved config and run info as the run's config; a resumed workdir continues the same W&B run
  (its id is kept in WORKDIR/logs/wandb_run_id). `WANDB_MODE=offline` works without an account.

The config and run info are always also in WORKDIR/config.json and run_info.json.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np

from nagjax.config import ConfigError
from nagjax.model.layers import SUBLAYER_NAMES


class TensorBoardLogger:
    def __init__(self, logdir: Path, run: dict):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._events = EventFileWriter(str(logdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        self._events.add_event(event)

    def log_run(self, config: dict, run_info: dict) -> None:
        """Config and run info as TensorBoard text (the TEXT tab), as indented JSON."""
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        values = []
        for tag, data in (("run/config", config), ("run/info", run_info)):
            text = "```\n" + json.dumps(data, indent=2) + "\n```"
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                            tensor_shape=tensor_shape_pb2.TensorShapeProto())
            values.append(summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor))
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                               summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class JsonlLogger:
    def __init__(self, logdir: Path, run: dict):
        self._f = open(logdir / "metrics.jsonl", "a", buffering=1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def log_run(self, config: dict, run_info: dict) -> None:
        pass  # config.json and run_info.json beside logs/ hold them

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class WandbLogger:
    def __init__(self, logdir: Path, run: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.loggers: wandb needs the wandb package: "
                              "pip install 'nagjax[wandb]' (or remove wandb from train.loggers)") from None
        id_file = logdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self._wandb = wandb
        self.run = wandb.init(project=run.get("project") or "nagjax", entity=run.get("entity") or None,
                              name=run.get("name"), id=run_id, resume="allow", dir=str(logdir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def log_run(self, config: dict, run_info: dict) -> None:
        self.run.config.update({**config, "run_info": run_info}, allow_val_change=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


LOGGER_CLASSES = {"tensorboard": TensorBoardLogger, "jsonl": JsonlLogger, "wandb": WandbLogger}


class ScalarWriter:
    """Fans scalars out to the configured loggers (only where `enabled`: process 0)."""

    def __init__(self, logdir: str | Path, *, enabled: bool = True,
                 loggers: tuple[str, ...] | list[str] = ("tensorboard", "jsonl"), run: dict | None = None):
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._loggers = []
        if enabled:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._loggers = [LOGGER_CLASSES[name](self.logdir, run or {}) for name in loggers]

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        for logger in self._loggers:
            logger.write(step, scalars)

    def log_run(self, config: dict, run_info: dict) -> None:
        """The resolved config and run info, once per run (when it starts)."""
        for logger in self._loggers:
            logger.log_run(config, run_info)

    def flush(self) -> None:
        for logger in self._loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()


def layer_scalars(layers: dict[str, np.ndarray]) -> dict[str, float]:
    """Flatten per-sublayer stats ([depth, 2] arrays) into tags like `layers/stream_rms/03_mlp`."""
    out = {}
    for name, values in layers.items():
        values = np.asarray(values)
        if values.ndim != 2:  # per-position or per-quantile arrays are for analysis, not scalars
            continue
        for block in range(values.shape[0]):
            for slot, sub in enumerate(SUBLAYER_NAMES):
                out[f"layers/{name}/{block:02d}_{sub}"] = float(values[block, slot])
    return out


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """Last record per step of a `metrics.jsonl` (a resumed run re-logs the steps it redoes)."""
    records: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                records.setdefault(rec["step"], {}).update(rec)
    return records
