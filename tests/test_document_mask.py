"""Document masking (`data.document_mask`): the pipeline marks each token's document (an EOS opens
the next) and, optionally, restarts positions; attention then keeps documents apart, through the
train and eval steps and Mixture-of-Depths routing (top-k gathers the documents with the tokens,
thresholds mask them too). A token's loss does not change when the previous document's tokens do;
without the flag batches and results are what they were."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_RUN
from nagjax.config import Config, ConfigError, apply_overrides
from nagjax.data import pipeline
from nagjax.model.residual.base import StepContext
from nagjax.model.transformer import build_model
from nagjax.train.step import batch_positions, token_loss
from nagjax.train.trainer import resolve

EOS = 1


def test_document_ids_and_restarting_positions():
    batch = {"inputs": np.array([[5, 6, EOS, 7, 8, EOS, 9]], np.int32)}
    out = pipeline.DocumentIds(EOS, restart_positions=True)(batch)
    assert out["documents"].tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert out["positions"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert pipeline.DocumentIds(EOS, False)(batch)["positions"].tolist() == [list(range(7))]


def test_pipeline_adds_documents_only_when_asked():
    cfg = apply_overrides(Config(), list(TINY_RUN)).data
    plain = pipeline.eval_batches(cfg, 1)[0]
    assert set(plain) == {"inputs", "targets"}
    masked = pipeline.eval_batches(dataclasses.replace(cfg, document_mask=True), 1)[0]
    np.testing.assert_array_equal(masked["inputs"], plain["inputs"])
    assert masked["documents"].shape == plain["inputs"].shape
    with pytest.raises(ConfigError, match="document_positions"):
        apply_overrides(Config(), ["data.document_positions=true"]).validate()


@pytest.mark.parametrize("residual,mod,restart", [("prenorm", None, False), ("nag", None, True),
                                                  ("nag", "threshold", False), ("attnres", None, True)])
def test_loss_after_eos_ignores_the_previous_document(residual, mod, restart):
    cfg = resolve(apply_overrides(Config(), [*TINY_RUN, f"model.residual={residual}", "model.depth=3",
                                             *(["mod.rate=0.5"] if mod else [])]))
    model = build_model(cfg.model, mod=cfg.mod)
    policy = model.mod_policy
    # thresholds: causal routing, per token (top-k's budget is the window's: the next test)
    routing = None if mod is None else policy.threshold_routing(jnp.full((3, 2), 0.5))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 4000, (2, 32)).astype(np.int32)
    tokens[:, 12] = EOS  # document 1 = tokens 12..31

    def losses(t):
        batch = pipeline.DocumentIds(EOS, restart)({"inputs": t, "targets": np.roll(t, -1, axis=1)})
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        state, _ = model.forward(batch["inputs"], batch_positions(batch), ctx=StepContext(routing=routing))
        return np.asarray(token_loss(model, state, batch["targets"]))

    changed = tokens.copy()
    changed[:, :12] = rng.integers(2, 4000, (2, 12))
    a, b = losses(tokens), losses(changed)
    np.testing.assert_allclose(a[:, 12:-1], b[:, 12:-1], rtol=0, atol=1e-6)  # (the last target wraps)
    assert np.abs(a[:, :12] - b[:, :12]).max() > 1e-3  # the changed document's own losses do change


def test_topk_routing_keeps_documents_apart():
    """Under top-k the kept tokens of a document attend only to kept tokens of that document."""
    cfg = resolve(apply_overrides(Config(), [*TINY_RUN, "model.residual=nag", "model.depth=2",
                                             "mod.rate=0.5", "mod.exempt_first_blocks=0"]))
    model = build_model(cfg.model, mod=cfg.mod)
    tokens = np.random.default_rng(1).integers(2, 4000, (1, 32)).astype(np.int32)
    tokens[:, 16] = EOS
    batch = pipeline.DocumentIds(EOS, False)({"inputs": tokens})
    pos = batch_positions({k: jnp.asarray(v) for k, v in batch.items()})
    masked, _ = model(jnp.asarray(tokens), pos, ctx=StepContext(routing=model.mod_policy.train_routing()))
    plain, _ = model(jnp.asarray(tokens), ctx=StepContext(routing=model.mod_policy.train_routing()))
    # before the EOS nothing differs; after it, the masked model no longer sees document 0
    np.testing.assert_allclose(np.asarray(masked)[:, :16], np.asarray(plain)[:, :16], atol=1e-5)
    assert np.abs(np.asarray(masked)[:, 17:] - np.asarray(plain)[:, 17:]).max() > 1e-4
