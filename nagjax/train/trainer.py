"""The training loop: side effects (files, logs, signals) live here, the math in `step.py`.

`train(config, workdir)` starts a run or, if `workdir` holds a checkpoint, resumes it exactly
(parameters, optimiser, step and data-iterator position); a damaged latest checkpoint is moved
aside and the next older one used (`train.strict_resume=true`: stop instead). Bad steps are skipped
on device (guard.py); `train.max_bad_steps` of them in a row roll the run back to its last
checkpoint (`Trainer.roll_back`). SIGTERM/SIGINT save a checkpoint at the current step and raise
`Interrupted` naming it (the CLI exits 143/130), once it is committed. Checkpoints are written in
the background while training continues (`train.async_checkpointing`); every process resumes from
the one step they agree on (`checkpoint.restore_agreed`); one trainer per workdir (workdir_lock.py).
"""

from __future__ import annotations

import dataclasses
import math
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
from nagjax.interrupts import Interrupted, StopSignal
from nagjax.model.layers import compute_dtype_name
from nagjax.model import pipeline as pipelining
from nagjax.model.loops import describe as describe_stack
from nagjax.model.taper import describe
from nagjax.train.checkpoint import CheckpointStore, abstract_like, restore_agreed, write_json_atomic
from nagjax.train.logging import ScalarWriter, layer_scalars
from nagjax.train.state import restore_state, training_state
from nagjax.train import guard as guard_lib
from nagjax.train.guard import TrainingDiverged
from nagjax.train.step import Steps
from nagjax.train.workdir_lock import lock_workdir

# Keys that may change when a run is resumed (they do not change what the model computes).
# How a step is computed (remat, unrolling, attention kernel, microbatches, loss chunks) may change
# too: the same function, scheduled differently.
RESUMABLE_KEYS = ("name", "description", "train.steps", "train.eval_every", "train.eval_batches",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                  "train.progress_bar", "train.grad_accum", "train.loss_chunk_tokens",
                  "train.max_bad_steps", "train.max_rollbacks", "train.skip_batches_on_rollback",
                  "train.spike_factor", "train.strict_resume", "train.async_checkpointing",
                  "train.loggers", "train.wandb_project", "train.wandb_entity",
                  "model.remat", "model.scan_unroll", "model.attention",
                  "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.dcn_data", "mesh.stage",
                  "pipeline.microbatches", "pipeline.repeats", "pipeline.cross_stage_cache")


@dataclass
class RunResult:
    workdir: Path
    step: int
    val_loss: float | None
    val_bpb: float | None
    eval: dict | None = None  # the last evaluation (`Trainer.evaluate`)


def resolve(config: Config, tokenizer=None) -> Config:
    """Fill derived values (vocabulary from the tokeniser, concrete compute dtype) and validate.
    `tokenizer`: the data's, when the caller has already loaded it."""
    tokenizer = tokenizer or mixture.tokenizer_of(config.data)
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


class Trainer:
    """`for_eval=True` opens an existing run without touching its files (no run files written,
    no checkpoint manager cleanup, no fallback past a damaged checkpoint) and without a
    training-data iterator."""

    def __init__(self, config: Config, workdir: str | Path, *, for_eval: bool = False):
        self.workdir = Path(workdir).absolute()
        # The data and config are checked before the workdir is touched: bad input changes nothing.
        tokenizer = mixture.tokenizer_of(config.data)  # loaded once: resolve, and the run's copy
        self.config = cfg = resolve(config, tokenizer)
        # the pipeline's schedule (None without stages): a model that cannot pipeline stops here
        self.schedule = (pipelining.schedule(cfg.model, cfg.pipeline, cfg.mesh.stage)
                         if cfg.mesh.stage > 1 else None)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # One trainer per workdir (eval only reads); then the checkpoints. Whatever fails from here
        # on closes both before it propagates (no manager left to the interpreter's shutdown).
        self.lock = None if for_eval else lock_workdir(self.workdir)
        self.store = None
        try:
            self.store = CheckpointStore(self.workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                                         read_only=for_eval, asynchronous=cfg.train.async_checkpointing)
            self._start(cfg, tokenizer, for_eval)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: Config, tokenizer, for_eval: bool) -> None:
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch_split(self.mesh, cfg.data.batch_size, cfg.train.grad_accum,
                                   cfg.pipeline.microbatch_count(cfg.mesh.stage))
        # the rows this process reads: processes that hold other stages of the same rows read them too
        self.batch_part = sharding.batch_part(self.mesh, cfg.data.batch_size)
        # Shapes first (nothing allocated), then one jit-compiled init straight into the shardings;
        # a resumed run never initialises, it restores into the abstract state.
        spec = training_state(cfg)
        self.graphdef, self.optimizer, self.lr_fn = spec.graphdef, spec.optimizer, spec.lr_fn
        self.n_params = spec.n_params
        self.data = None if for_eval else pipeline.train_iterator(  # eval reads no training data
            cfg.data, process_index=self.batch_part[0], process_count=self.batch_part[1]
        )
        # Shardings of the whole state from the logical-axis rules (params and optimiser moments
        # sharded alike, the rest replicated); the steps keep them fixed (sharding.shard_steps).
        self.state_shardings = sharding.state_shardings(self.mesh, spec.abstract)
        self.steps: Steps = sharding.shard_steps(spec.steps, self.mesh, self.state_shardings)
        self._init_state = jax.jit(spec.init, out_shardings=self.state_shardings)
        # Orbax reads each array straight into its (possibly different) mesh and sharding.
        self._abstract = abstract_like(spec.abstract, self.state_shardings)
        # The newest checkpoint every process restores; an older one when it is damaged (moved aside).
        resumed = restore_agreed(
            self.store, self._restore, fallback=not (for_eval or cfg.train.strict_resume),
            report=lambda line: print(line, file=sys.stderr, flush=True))
        self.resume_step = None if resumed is None else resumed[0]  # the checkpoint it started from
        if resumed is None:
            self.step, self.state = 0, self._init_state()
        else:
            self.step, (self.state, data_state) = resumed
            if self.data is not None:
                self.data.set_state(data_state)
        self.run_info = run_info()
        if jax.process_index() == 0 and not for_eval:  # one writer on a shared filesystem
            write_json_atomic(self.workdir / "config.json", self.config.to_dict())
            write_json_atomic(self.workdir / "run_info.json", self.run_info)
            mixture.keep_with_run(tokenizer, self.workdir)  # sample/export anywhere
        self.flops_per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len, mod=cfg.mod)
        self._eval_batches = None

    def close(self) -> None:
        """Finish the checkpoint in flight, close the manager and free the workdir; idempotent."""
        store, self.store = self.store, None
        try:
            if store is not None:
                store.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def layout(self) -> str:
        """The mesh, the pipeline schedule (stages, microbatches, bubble) and the training state
        one device holds: the line a run starts with."""
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items() if v > 1) or "1 device"
        state = sharding.per_device_bytes(self._abstract, self.state_shardings)
        pipe = "no pipeline" if self.schedule is None else f"pipeline {self.schedule.describe()}"
        return f"mesh {mesh}; {pipe}; per device: {state / 2**20:,.1f} MiB of parameters and optimiser state"

    def _restore(self, step: int) -> tuple[dict, dict]:
        """(state, data-iterator state) of checkpoint `step`, after checking that its run is
        this config's (a mismatch is a ConfigError, never taken for a damaged checkpoint)."""
        saved = config_from_dict(self.store.restore_config(step))
        check_resume_compatible(saved, self.config, self.workdir)
        return restore_state(self.store, self._abstract, step)

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation loss (causal: a MoD model runs its trained thresholds) and bits per byte;
        for a model that trains with MoD also the top-k loss (a diagnostic: top-k looks at later
        tokens), the realised skip rate and the executed forward FLOPs per token. A mixture
        (data.sources) adds "by_source": {name: {"loss", "bpb"}}, and its top-level values are
        the weighted means over the sources (data/mixture.py)."""
        cfg = self.config
        if self._eval_batches is None:
            self._eval_batches = pipeline.eval_sets(
                cfg.data, cfg.train.eval_batches,
                process_index=self.batch_part[0], process_count=self.batch_part[1],
            )
        keys = ("loss_sum", "count", "loss_topk_sum")
        loss, bpb, topk, skip, by_source = 0.0, 0.0, 0.0, 0.0, {}
        for es in self._eval_batches:
            sums, skip_rates = dict.fromkeys(keys, 0.0), []
            for batch in es.batches:
                out = jax.device_get(self.steps.eval(self.state["params"], self.state["aux"],
                                                     sharding.global_batch(self.mesh, batch)))
                for key in sums:
                    sums[key] += float(out.get(key, 0.0))
                if "skip_rate" in out:
                    skip_rates.append(np.asarray(out["skip_rate"]))
            source = {"loss": sums["loss_sum"] / sums["count"]}
            source["bpb"] = source["loss"] / math.log(2) / es.bytes_per_token
            by_source[es.name] = source
            # each source counts by its weight (per-token means; its batches have equal sizes)
            loss += es.weight * source["loss"]
            bpb += es.weight * source["bpb"]
            topk += es.weight * sums["loss_topk_sum"] / sums["count"]
            if skip_rates:
                skip = skip + es.weight * np.mean(skip_rates, axis=0)  # [depth, 2]
        result = {"loss": loss, "bpb": bpb}
        if np.ndim(skip):
            result["loss_topk"] = topk
            result["skip_rate"] = float(skip.mean())
            result["forward_flops_per_token"] = flops.forward_breakdown(
                cfg.model, cfg.data.seq_len, mod=cfg.mod, executed=1.0 - skip).forward
        if len(self._eval_batches) > 1:
            result["by_source"] = by_source
        return result

    def _warn_if_corpus_repeats(self, limit: float = 4.0) -> None:
        """A run that reads its training corpus more than `limit` times learns the corpus, not
        the language: say so before it starts (results from such runs mislead)."""
        cfg = self.config
        epochs = pipeline.corpus_passes(cfg.data, cfg.train.steps)
        if epochs > limit and jax.process_index() == 0:
            print(f"[nagjax] warning: {cfg.train.steps} steps x {cfg.data.batch_size} sequences read the "
                  f"training corpus ({cfg.data.sources or cfg.data.source}) {epochs:.1f} times; above {limit:g} "
                  "passes a run mostly memorises it. Use a larger corpus (`nagjax data`, or "
                  "scripts/build_real_corpus.py) or fewer steps.", file=sys.stderr, flush=True)

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, step: int) -> None:
        self.step = step
        self.store.save(step, self.state, self.data.get_state(), self.config.to_dict())

    def _last_checkpoint(self) -> str:
        latest = self.store.latest_step()
        return "none yet" if latest is None else f"step {latest} in {self.store.directory}"

    def roll_back(self, step: int, guard: dict) -> int:
        """After `train.max_bad_steps` bad steps in a row at `step`: restore the newest checkpoint
        that restores (or the initial state), keep the data iterator where it is (the bad batches
        stay behind) and drop `train.skip_batches_on_rollback` more batches. Returns the step the
        run continues from; raises TrainingDiverged once `train.max_rollbacks` are used up."""
        tc, oc = self.config.train, self.config.optim
        rollbacks = int(guard["rollbacks"]) + 1
        if rollbacks > tc.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged at step {step}: {tc.max_bad_steps} bad steps in a row ({_BAD}) "
                f"after {tc.max_rollbacks} rollback(s) (train.max_rollbacks). Lower optim.lr (now "
                f"{oc.lr:g}), raise optim.warmup_steps (now {oc.warmup_steps}), keep optim.grad_clip on "
                f"(now {oc.grad_clip:g}), or check the data before step {step}; last good checkpoint: "
                f"{self._last_checkpoint()}.")
        self.state = None  # the frozen state is the last good one; free it before restoring
        resumed = restore_agreed(self.store, lambda s: self._restore(s)[0], fallback=not tc.strict_resume,
                                 report=lambda line: print(line, file=sys.stderr, flush=True))
        back, state = (0, self._init_state()) if resumed is None else resumed
        set_guard = jax.jit(_with_guard_after_rollback, out_shardings=self.state_shardings, donate_argnums=0)
        self.state = set_guard(state, rollbacks, int(guard["skipped_steps"]))
        for _ in range(tc.skip_batches_on_rollback):
            next(self.data)
        self.step = back
        return back

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
            print(f"[nagjax] {cfg.name}: {cfg.model.residual}, {describe_stack(cfg.model)}, d={cfg.model.d_model}, "
                  f"{self.n_params / 1e6:.2f}M params, {self.flops_per_token / 1e6:.1f} MFLOP/token (train), "
                  f"{tc.steps} steps x {tokens_per_step} tokens -> {self.workdir}", flush=True)
            if cfg.model.taper != "none":
                print(describe(cfg.model), flush=True)
            print(f"[nagjax] {self.layout()}", flush=True)
        else:
            print(f"[nagjax] resuming {self.workdir} at step {step}/{tc.steps}", flush=True)
        self._warn_if_corpus_repeats()
        result = RunResult(self.workdir, step, None, None)
        bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress_bar or jax.process_index() != 0,
                   dynamic_ncols=True, desc=cfg.name)
        last_time, last_step = time.perf_counter(), step
        save_pending = False  # a checkpoint due during a bad streak waits for the next good step
        second = lambda: f"second signal, stopped without saving; last checkpoint: {self._last_checkpoint()}"
        with StopSignal(second) as stop:
            while step < tc.steps:
                batch = sharding.global_batch(self.mesh, next(self.data))
                self.state, metrics = self.steps.train(self.state, batch, step)
                step += 1
                bar.update(1)
                done = step == tc.steps
                log_now = step % tc.log_every == 0 or done
                save_now = bool(tc.checkpoint_every and step % tc.checkpoint_every == 0) or done or save_pending
                if log_now or save_now or stop.received:  # the host syncs here anyway
                    guard = {k: int(v) for k, v in jax.device_get(metrics["guard"]).items()}
                    if guard["bad_streak"] >= tc.max_bad_steps:
                        if stop.received:
                            raise Interrupted(stop.received, f"stopped during {guard['bad_streak']} bad steps "
                                              f"in a row; last checkpoint: {self._last_checkpoint()}")
                        step = self.roll_back(step, guard)
                        bar.write(f"[nagjax] {tc.max_bad_steps} bad steps in a row ({_BAD}): rolled back to "
                                  f"step {step}, skipping {tc.skip_batches_on_rollback} more batches "
                                  f"(rollback {guard['rollbacks'] + 1} of at most {tc.max_rollbacks})")
                        bar.n, save_pending = step, False
                        bar.refresh()
                        last_time, last_step = time.perf_counter(), step
                        continue
                if log_now:
                    m = jax.device_get(metrics)
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, step
                    scalars = {"train/loss": m["loss"], "train/lr": m["lr"], "train/grad_norm": m["grad_norm"],
                               "train/skipped_steps": guard["skipped_steps"], "train/rollbacks": guard["rollbacks"],
                               "perf/tokens_per_s": tok_s, **layer_scalars(m["layers"]),
                               **{f"blocks/grad_norm/{i:02d}": v for i, v in enumerate(m["block_grad_norm"])}}
                    util = flops.mfu(tok_s, self.flops_per_token, device_kind, jax.device_count())
                    if util is not None:
                        scalars["perf/mfu"] = util
                    log.write(step, scalars)
                    bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tok_s:,.0f}")
                if (tc.eval_every and step % tc.eval_every == 0) or done:
                    ev = self.evaluate()
                    log.write(step, {f"eval/{k}": v for k, v in ev.items() if k != "by_source"} | {
                        f"eval/{k}/{name}": v[k] for name, v in ev.get("by_source", {}).items() for k in v})
                    result.val_loss, result.val_bpb, result.eval = ev["loss"], ev["bpb"], ev
                    topk = (f" (top-k routing, not causal: {ev['loss_topk']:.4f}; skip rate {ev['skip_rate']:.3f})"
                            if "loss_topk" in ev else "")
                    per = "".join(f"; {n} {v['loss']:.4f}" for n, v in ev.get("by_source", {}).items())
                    bar.write(f"[nagjax] step {step}: val loss {ev['loss']:.4f}, {ev['bpb']:.4f} bits/byte{per}{topk}")
                if save_now or stop.received:
                    # Never a periodic checkpoint inside a bad streak: a rollback must land on a good step.
                    save_pending = guard["bad_streak"] > 0 and not (done or stop.received)
                    if not save_pending:
                        self.save(step)
                        log.flush()
                if stop.received:
                    self.store.wait()  # committed before the message says so
                    bar.close()
                    log.close()
                    raise Interrupted(stop.received, f"saved checkpoint at step {step} in {self.store.directory}")
        if result.val_loss is None and step >= tc.steps:  # resumed a finished run: still report
            ev = self.evaluate()
            result.val_loss, result.val_bpb, result.eval = ev["loss"], ev["bpb"], ev
        self.store.wait()  # the last checkpoint is committed when run() returns
        bar.close()
        log.close()
        result.step = step
        return result


_BAD = "non-finite loss or gradient norm, or a loss spike"


def _with_guard_after_rollback(state: dict, rollbacks, skipped_steps) -> dict:
    guard = guard_lib.after_rollback(state["aux"]["guard"], rollbacks=rollbacks, skipped_steps=skipped_steps)
    return {**state, "aux": {**state["aux"], "guard": guard}}


def train(config: Config, workdir: str | Path) -> RunResult:
    trainer = Trainer(config, workdir)
    try:
        return trainer.run()
    finally:
        trainer.close()


def evaluate_workdir(workdir: str | Path, eval_batches: int | None = None) -> dict[str, float]:
    """Validation loss and bits per byte of the latest checkpoint in `workdir`."""
    workdir = Path(workdir).absolute()
    with CheckpointStore(workdir / "checkpoints", read_only=True) as store:
        if store.latest_step() is None:
            raise FileNotFoundError(
                f"no complete checkpoint in {store.directory}: run `nagjax train --workdir {workdir}` first"
            )
        config = config_from_dict(store.restore_config())
    if eval_batches:
        config = config.replace(train=dataclasses.replace(config.train, eval_batches=eval_batches))
    trainer = Trainer(config, workdir, for_eval=True)
    try:
        out = trainer.evaluate()
        out["step"] = trainer.step
        return out
    finally:
        trainer.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `nagjax` command")
