"""Long runs survive their own failures: bad steps are skipped on device, a streak of them rolls
the run back to its last checkpoint, running out of rollbacks stops with a clear message, and
SIGINT/SIGTERM end every command with one line and exit 130/143.

Bad steps are injected into the real jitted step: `poison` makes chosen batches of the training
iterator (counted from 1 as they are read, so a step redone after a rollback reads a new one)
carry a scale that the patched `step.train_loss` applies to the loss, or only to its gradient.
No host callback: the poisoned step is an ordinary program, compiled once per config.
"""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_RUN
from nagjax import sharding
from nagjax.cli import main
from nagjax.config import Config, apply_overrides
from nagjax.data import pipeline
from nagjax.interrupts import Interrupted, StopSignal
from nagjax.registry import get_experiment, load_experiments
from nagjax.train import guard as guard_lib
from nagjax.train import step as step_lib
from nagjax.train.checkpoint import CheckpointStore
from nagjax.train.logging import ScalarWriter, read_metrics
from nagjax.train.trainer import Trainer

NAN = float("nan")
# One config for every test here: they differ only in host-side keys, so the (poisoned) train step
# is one program, compiled once and then read from the compilation cache.
RUN = [*TINY_RUN, "model.residual=prenorm", "train.steps=10", "train.max_bad_steps=2", "train.spike_factor=3",
       "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "optim.warmup_steps=2"]


@pytest.fixture(autouse=True)
def compilation_cache():
    from nagjax.runtime import enable_compilation_cache

    enable_compilation_cache()  # as the CLI does (under the session's fresh nagjax cache)


def run_config(*overrides) -> Config:
    load_experiments()  # the CLI's default experiment, as `main(["train", ...])` builds it
    return apply_overrides(get_experiment("quickstart"), [*RUN, *overrides])


@jax.custom_vjp
def _scale_grad(x, s):
    return x


def _scale_grad_fwd(x, s):
    return x, s


def _scale_grad_bwd(s, g):
    return g * s, jnp.zeros_like(s)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _poisoned_loss(original):
    def train_loss(graphdef, params, batch, step, routing, **kwargs):
        tokens = {"inputs": batch["inputs"], "targets": batch["targets"]}
        loss, stats = original(graphdef, params, tokens, step, routing, **kwargs)
        return _scale_grad(loss * batch["loss_scale"][0], batch["grad_scale"][0]), stats

    return train_loss


def with_scales(batch: dict, loss: float = 1.0, grad: float = 1.0) -> dict:
    rows = len(batch["inputs"])
    return {**batch, "loss_scale": np.full((rows,), loss, np.float32),
            "grad_scale": np.full((rows,), grad, np.float32)}


class _PoisonedBatches:
    """The training iterator, with scales on the chosen batches (1-based read count)."""

    def __init__(self, it, loss_scale: dict, grad_scale: dict, from_batch: int | None):
        self.it, self.loss_scale, self.grad_scale, self.from_batch = it, loss_scale, grad_scale, from_batch
        self.read = 0

    def __next__(self):
        self.read += 1
        n = self.read
        loss = NAN if self.from_batch is not None and n >= self.from_batch else self.loss_scale.get(n, 1.0)
        return with_scales(next(self.it), loss, self.grad_scale.get(n, 1.0))

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def poison(monkeypatch, loss_scale: dict[int, float] | None = None, grad_scale: dict[int, float] | None = None,
           from_batch: int | None = None) -> None:
    """Scale the loss (`loss_scale`) or only its gradient (`grad_scale`) of the given training
    batches; `from_batch`: every batch from then on has a NaN loss."""
    monkeypatch.setattr(step_lib, "train_loss", _poisoned_loss(step_lib.train_loss))
    original = pipeline.train_iterator
    monkeypatch.setattr(pipeline, "train_iterator", lambda *a, **k: _PoisonedBatches(
        original(*a, **k), loss_scale or {}, grad_scale or {}, from_batch))


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_bad_steps_change_nothing_but_the_counters(monkeypatch, tmp_path):
    poison(monkeypatch)
    trainer = Trainer(run_config(), tmp_path)
    trainer.close()
    local = next(trainer.data.it)
    state, history = trainer.state, []

    def run(i, loss=1.0, grad=1.0):
        nonlocal state
        before = jax.device_get(state)
        batch = sharding.global_batch(trainer.mesh, with_scales(local, loss, grad))
        state, m = trainer.steps.train(state, batch, i)
        m = jax.device_get(m)
        history.append((before, jax.device_get(state), m))
        return m

    m = run(0)
    assert not m["guard"]["bad"] and np.isfinite(m["loss"])
    m = run(1, loss=NAN)
    assert m["guard"]["bad"] and not np.isfinite(m["loss"])
    m = run(2, grad=NAN)  # a finite loss with a NaN gradient
    assert m["guard"]["bad"] and np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"])
    assert m["guard"]["bad_streak"] == 2 and m["guard"]["skipped_steps"] == 2
    m = run(3)  # fine, but the run is max_bad_steps deep: frozen until the host rolls back
    assert m["guard"]["bad"] and np.isfinite(m["loss"]) and m["guard"]["bad_streak"] == 3
    # the logged rate is the optimiser's: one update applied (step 0), so lr(1) at steps 1-3, not lr(step)
    assert [h[2]["lr"] for h in history] == [trainer.lr_fn(0), *[trainer.lr_fn(1)] * 3]
    assert trainer.lr_fn(1) != trainer.lr_fn(3)  # warm-up: the rates differ
    for before, after, m in history[1:]:
        assert _leaves_equal({k: v for k, v in before["aux"].items() if k != "guard"},
                             {k: v for k, v in after["aux"].items() if k != "guard"})
        assert _leaves_equal(before["params"], after["params"])
        assert _leaves_equal(before["opt_state"], after["opt_state"])
        assert after["aux"]["guard"]["loss_ema"] == before["aux"]["guard"]["loss_ema"]
    state = jax.jit(lambda s: {**s, "aux": {**s["aux"], "guard": guard_lib.after_rollback(
        s["aux"]["guard"], rollbacks=1, skipped_steps=3)}}, out_shardings=trainer.state_shardings)(state)
    m = run(4)  # good again after the host's reset
    assert not m["guard"]["bad"] and m["guard"]["bad_streak"] == 0 and m["guard"]["rollbacks"] == 1
    good_loss = float(m["loss"])
    m = run(5, loss=10.0)  # a finite spike: > spike_factor (3) x the running mean
    assert m["guard"]["bad"] and np.isfinite(m["loss"]) and m["loss"] > 3 * good_loss
    assert m["guard"]["skipped_steps"] == 4
    m = run(6, loss=1.5)  # above the mean but within the factor: a good step
    assert not m["guard"]["bad"] and m["guard"]["skipped_steps"] == 4
    assert not _leaves_equal(history[-1][0]["params"], history[-1][1]["params"])  # a good step moves


def test_rollback_after_a_bad_streak_then_the_run_finishes(monkeypatch, tmp_path, capsys):
    # steps 1-5 good (checkpoint 3); step 6 bad, so its checkpoint waits for step 7; steps 8 and 9
    # bad: roll back to 7, skip 2 batches (reads 10, 11), redo steps 8-10 on new batches.
    poison(monkeypatch, loss_scale={6: NAN, 8: NAN, 9: NAN})
    config = run_config("train.checkpoint_every=3", "train.keep_checkpoints=10",
                        "train.skip_batches_on_rollback=2")
    trainer = Trainer(config, tmp_path)
    try:
        result = trainer.run()
        assert result.step == 10 and np.isfinite(result.val_loss)
        assert trainer.store.all_steps() == [3, 7, 9, 10]  # nothing saved during the bad steps
        # 9 batches read before the rollback, 2 skipped, 3 more for steps 8-10
        assert trainer.data.read == 9 + 2 + 3 and trainer.data.get_state()["next_index"] == 14
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert "2 bad steps in a row" in out and "rolled back to step 7, skipping 2 more batches" in out
    last = read_metrics(tmp_path / "logs" / "metrics.jsonl")[10]
    assert last["train/skipped_steps"] == 3 and last["train/rollbacks"] == 1
    assert np.isfinite(last["train/loss"])


def test_running_out_of_rollbacks_stops_with_what_to_change(monkeypatch, tmp_path, capsys):
    poison(monkeypatch, from_batch=3)  # diverges at step 3, and again after the rollback
    rc = main(["train", "--workdir", str(tmp_path), "--set", *RUN, "train.checkpoint_every=2",
               "train.max_rollbacks=1"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "rolled back to step 2" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("nagjax: error: training diverged at step 4: 2 bad steps in a row")
    assert "after 1 rollback(s)" in err and "optim.lr" in err and "optim.warmup_steps" in err
    assert f"last good checkpoint: step 2 in {tmp_path / 'checkpoints'}" in err
    assert CheckpointStore(tmp_path / "checkpoints", read_only=True).all_steps() == [2]


def _signal_at_logged_step(monkeypatch, step: int, sig: signal.Signals) -> None:
    write = ScalarWriter.write

    def patched(self, logged_step, scalars):
        write(self, logged_step, scalars)
        if "train/loss" in scalars and logged_step == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(ScalarWriter, "write", patched)


SWEEP_FILE = '''
import dataclasses
from nagjax import flops
from nagjax.config import apply_overrides
from nagjax.registry import get_experiment, sweep
from nagjax.sweep import IsoFlopSweep, Variant

@sweep
def interrupt_me():
    """Two variants of RUN, 10 steps each."""
    base = apply_overrides(get_experiment("quickstart"), RUN)
    model = dataclasses.replace(base.model, vocab_size=4096)  # the tokeniser's, as resolved
    step_flops = flops.train_flops_per_token(model, base.data.seq_len, mod=base.mod) * 4 * 32
    return IsoFlopSweep(base=base, budget_flops=10 * step_flops, variants=(Variant("a"), Variant("b")))
'''


def test_sigterm_in_a_sweep_saves_the_variant_and_exits_143(monkeypatch, tmp_path, capsys):
    poison(monkeypatch)  # no bad batch: only so that the step is the program compiled above
    (tmp_path / "tiny_sweeps.py").write_text(f"RUN = {RUN!r}\n" + SWEEP_FILE)
    _signal_at_logged_step(monkeypatch, 2, signal.SIGTERM)
    workdir = tmp_path / "sweep"
    rc = main(["sweep", "--sweep", "interrupt_me", "--workdir", str(workdir),
               "--experiments-dir", str(tmp_path / "tiny_sweeps.py")])
    assert rc == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"nagjax: SIGTERM: saved checkpoint at step 2 in {workdir / 'a' / 'lr0.003-s0' / 'checkpoints'}; "
        "rerun the sweep to resume run a/lr0.003-s0; exiting")
    run = workdir / "a" / "lr0.003-s0"
    assert CheckpointStore(run / "checkpoints", read_only=True).latest_step() == 2
    assert not (run / "result.json").exists() and not (workdir / "b").exists()


def test_sigint_in_nagjax_data_keeps_the_output_as_it_was(monkeypatch, tmp_path, capsys):
    from nagjax.data import tokenizer

    def interrupted_training(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have stopped the command")

    monkeypatch.setattr(tokenizer, "train_tokenizer", interrupted_training)
    (tmp_path / "in.txt").write_text("some text\n\n\nmore text\n")
    rc = main(["data", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "shards")])
    assert rc == 130
    err = capsys.readouterr().err
    assert err.strip() == f"nagjax: SIGINT: interrupted; {tmp_path / 'shards'} left as it was; exiting"
    assert not (tmp_path / "shards").exists() and list(tmp_path.iterdir()) == [tmp_path / "in.txt"]


def test_a_second_signal_stops_at_once():
    with StopSignal(lambda: "stopped without saving") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert str(e.value) == "SIGINT: stopped without saving; exiting" and e.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is not stop.handle  # handlers restored


def test_quiet_libtpu_fills_only_what_is_missing(monkeypatch):
    from nagjax import runtime

    monkeypatch.setattr(runtime, "_on_tpu_vm", lambda: False)
    env = {"TPU_WORKER_HOSTNAMES": "w0,w1"}
    runtime.quiet_libtpu(env)
    assert env == {"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_HOST_BOUNDS": "1,1,1"}
    monkeypatch.setattr(runtime, "_on_tpu_vm", lambda: True)
    env = {}
    runtime.quiet_libtpu(env)
    assert env == {}
