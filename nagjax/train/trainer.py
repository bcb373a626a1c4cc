"""The training loop: side effects (files, logs, signals) live here, the math in `step.py`.

`train(config, workdir)` starts a run or, if `workdir` holds a checkpoint, resumes it exactly
(parameters, optimiser, step and data-iterator position). SIGTERM/SIGINT save a checkpoint at the
current step and return cleanly.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from nagjax import flops, sharding
from nagjax.config import Config, ConfigError, config_from_dict
from nagjax.data import mixture, pipeline
from nagjax.model.layers import compute_dtype_name
from nagjax.train.checkpoint import CheckpointStore, abstract_like, write_json_atomic
from nagjax.train.logging import ScalarWriter, layer_scalars
from nagjax.train.state import training_state
from nagjax.train.step import Steps

# Keys that may change when a run is resumed (they do not change what the model computes).
# How a step is computed (remat, unrolling, attention kernel, microbatches, loss chunks) may change
# too: the same function, scheduled differently.
RESUMABLE_KEYS = ("name", "description", "train.steps", "train.eval_every", "train.eval_batches",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                  "train.progress_bar", "train.grad_accum", "train.loggers", "train.wandb_project",
                  "train.wandb_entity", "train.loss_chunk_tokens",
                  "model.remat", "model.scan_unroll", "model.attention",
                  "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.dcn_data")


@dataclass
class RunResult:
    workdir: Path
    step: int
    val_loss: float | None
    val_bpb: float | None
    interrupted: bool = False


def resolve(config: Config) -> Config:
    """Fill derived values (vocabulary from the tokeniser, concrete compute dtype) and validate."""
    tokenizer = mixture.tokenizer_of(config.data)
    model = config.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    elif model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokeniser's vocabulary "
            f"({tokenizer.vocab_size}); set model.vocab_size=0 to take it from the tokeniser"
        )
    model = dataclasses.replace(model, compute_dtype=compute_dtype_name(model))
    return config.replace(model=model).validate()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_compatible(saved: Config, requested: Config, workdir: Path) -> Config:
    """The saved run's config with the requested values of the keys that may change on resume."""
    a, b = _flatten(saved.to_dict()), _flatten(requested.to_dict())
    changed = [k for k in a if a[k] != b.get(k) and k not in RESUMABLE_KEYS]
    if changed:
        diffs = ", ".join(f"{k}: saved {a[k]!r} vs requested {b.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{workdir} holds a run with a different configuration ({diffs}). "
            "Resume with the same settings or choose a new --workdir."
        )
    return requested


def run_info() -> dict:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "git_revision": rev or None,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after every step."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """`for_eval=True` opens an existing run without touching its files (no run files written,
    no checkpoint manager cleanup) and without a training-data iterator."""

    def __init__(self, config: Config, workdir: str | Path, *, for_eval: bool = False):
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(self.workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                     read_only=for_eval)
        requested = resolve(config)
        resume_step = self.store.latest_step()
        if resume_step is not None:
            saved = config_from_dict(self.store.restore_config(resume_step))
            requested = check_resume_compatible(saved, requested, self.workdir)
        self.config = requested
        self.resume_step = resume_step
        self.run_info = run_info()
        if jax.process_index() == 0 and not for_eval:  # one writer on a shared filesystem
            write_json_atomic(self.workdir / "config.json", self.config.to_dict())
            write_json_atomic(self.workdir / "run_info.json", self.run_info)

        cfg = self.config
        self.mesh = sharding.make_mesh(cfg.mesh)
        # Shapes first (nothing allocated), then one jit-compiled init straight into the shardings;
        # a resumed run never initialises, it restores into the abstract state.
        spec = training_state(cfg)
        self.graphdef, self.optimizer, self.lr_fn = spec.graphdef, spec.optimizer, spec.lr_fn
        self.n_params = spec.n_params
        init_state, abstract_state = spec.init, spec.abstract
        self.data = None if for_eval else pipeline.train_iterator(  # eval reads no training data
            cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
        )
        # Shardings of the whole state from the logical-axis rules (params and optimiser moments
        # sharded alike, the rest replicated); the steps keep them fixed (sharding.shard_steps).
        self.state_shardings = sharding.state_shardings(self.mesh, abstract_state)
        self.steps: Steps = sharding.shard_steps(spec.steps, self.mesh, self.state_shardings)
        if resume_step is None:
            self.state = jax.jit(init_state, out_shardings=self.state_shardings)()
        else:  # Orbax reads each array straight into its (possibly different) mesh and sharding
            abstract = abstract_like(abstract_state, self.state_shardings)
            restored, data_state, _ = self.store.restore(abstract, resume_step)
            self.state = restored
            if self.data is not None:
                self.data.set_state(data_state)
        self.step = resume_step or 0  # the checkpoint's step is its number; state holds no step
        self.flops_per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        self._eval_batches = None

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, params=None) -> dict:
        """Validation loss and bits per byte: {"loss", "bpb", "by_source": {name: {...}}}; for a
        mixture the top-level values are the weighted means over its sources (mixture.py)."""
        cfg = self.config
        if self._eval_batches is None:
            self._eval_batches = pipeline.eval_sets(
                cfg.data, cfg.train.eval_batches,
                process_index=jax.process_index(), process_count=jax.process_count(),
            )
        params = self.state["params"] if params is None else params
        out = {"loss": 0.0, "bpb": 0.0, "by_source": {}}
        for es in self._eval_batches:
            total, count = 0.0, 0.0
            for batch in es.batches:
                loss_sum, n = self.steps.eval(params, sharding.global_batch(self.mesh, batch))
                total += float(loss_sum)
                count += float(n)
            loss = total / count
            bpb = loss / math.log(2) / es.bytes_per_token
            if len(self._eval_batches) == 1:
                out["loss"], out["bpb"] = loss, bpb
            else:
                out["loss"] += es.weight * loss
                out["bpb"] += es.weight * bpb
                out["by_source"][es.name] = {"loss": loss, "bpb": bpb}
        return out

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, step: int) -> None:
        self.step = step
        self.store.save(step, self.state, self.data.get_state(), self.config.to_dict())

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg, tc = self.config, self.config.train
        step = self.step
        log = ScalarWriter(self.workdir / "logs", enabled=jax.process_index() == 0, loggers=tc.logger_list,
                           run={"project": tc.wandb_project, "entity": tc.wandb_entity, "name": cfg.name})
        if step == 0:
            log.log_run(cfg.to_dict(), self.run_info)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        device_kind = jax.devices()[0].device_kind
        if step == 0:
            print(f"[nagjax] {cfg.name}: {cfg.model.residual}, {cfg.model.depth} blocks, d={cfg.model.d_model}, "
                  f"{self.n_params / 1e6:.2f}M params, {self.flops_per_token / 1e6:.1f} MFLOP/token (train), "
                  f"{tc.steps} steps x {tokens_per_step} tokens -> {self.workdir}", flush=True)
            if cfg.model.taper != "none":
                from nagjax.model.taper import describe

                print(describe(cfg.model), flush=True)
        else:
            print(f"[nagjax] resuming {self.workdir} at step {step}/{tc.steps}", flush=True)
        result = RunResult(self.workdir, step, None, None)
        bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress_bar or jax.process_index() != 0,
                   dynamic_ncols=True, desc=cfg.name)
        last_time, last_step = time.perf_counter(), step
        with _StopSignal() as stop:
            while step < tc.steps:
                batch = sharding.global_batch(self.mesh, next(self.data))
                self.state, metrics = self.steps.train(self.state, batch, step)
                step += 1
                bar.update(1)
                done = step == tc.steps
                if step % tc.log_every == 0 or done:
                    m = jax.device_get(metrics)
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, step
                    scalars = {"train/loss": m["loss"], "train/lr": m["lr"], "train/grad_norm": m["grad_norm"],
                               "perf/tokens_per_s": tok_s, **layer_scalars(m["layers"]),
                               **{f"blocks/grad_norm/{i:02d}": v for i, v in enumerate(m["block_grad_norm"])}}
                    util = flops.mfu(tok_s, self.flops_per_token, device_kind, jax.device_count())
                    if util is not None:
                        scalars["perf/mfu"] = util
                    log.write(step, scalars)
                    bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tok_s:,.0f}")
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(f"loss is {m['loss']} at step {step}; lower optim.lr")
                if (tc.eval_every and step % tc.eval_every == 0) or done:
                    ev = self.evaluate()
                    log.write(step, {"eval/loss": ev["loss"], "eval/bpb": ev["bpb"], **{
                        f"eval/{k}/{name}": v[k] for name, v in ev["by_source"].items() for k in v}})
                    result.val_loss, result.val_bpb = ev["loss"], ev["bpb"]
                    per = "".join(f"; {n} {v['loss']:.4f}" for n, v in ev["by_source"].items())
                    bar.write(f"[nagjax] step {step}: val loss {ev['loss']:.4f}, {ev['bpb']:.4f} bits/byte{per}")
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or done or stop.received:
                    self.save(step)
                    log.flush()
                if stop.received:
                    bar.write(f"[nagjax] {stop.received}: saved checkpoint at step {step}; exiting")
                    result.interrupted = True
                    break
        if result.val_loss is None and step >= tc.steps:  # resumed a finished run: still report
            ev = self.evaluate()
            result.val_loss, result.val_bpb = ev["loss"], ev["bpb"]
        bar.close()
        log.close()
        result.step = step
        return result


def train(config: Config, workdir: str | Path) -> RunResult:
    trainer = Trainer(config, workdir)
    try:
        return trainer.run()
    finally:
        trainer.store.close()


def evaluate_workdir(workdir: str | Path, eval_batches: int | None = None) -> dict[str, float]:
    """Validation loss and bits per byte of the latest checkpoint in `workdir`."""
    workdir = Path(workdir).absolute()
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    if store.latest_step() is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {store.directory}: run `nagjax train --workdir {workdir}` first"
        )
    config = config_from_dict(store.restore_config())
    store.close()
    if eval_batches:
        config = config.replace(train=dataclasses.replace(config.train, eval_batches=eval_batches))
    trainer = Trainer(config, workdir, for_eval=True)
    try:
        out = trainer.evaluate()
        out["step"] = trainer.step
        return out
    finally:
        trainer.store.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `nagjax` command")
