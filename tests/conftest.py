"""Shared fixtures. Tests run on CPU; GPU tests are marked `gpu` and skip without a GPU.

Two tiny sizes are shared by the suite: `tiny_model(**changes)` builds the ModelConfig of the
model-level tests (vocabulary 97, d=32, 3 blocks, float32), and `tiny_run` is the list of dotted
overrides of a training run on the embedded corpus that takes seconds (d=32, 2 blocks, 4 x 32
tokens); a test appends its own overrides (later ones win). Module-level helpers and the
subprocess scripts import the constants (`from conftest import TINY_RUN`).
"""

from __future__ import annotations

import jax
import pytest

import nagjax.model  # noqa: F401  (registers the built-in residual schemes: a file run alone needs them)
from nagjax.config import ModelConfig

TINY_MODEL = dict(vocab_size=97, d_model=32, depth=3, n_heads=4, d_ff=64, compute_dtype="float32")
TINY_RUN = (
    "model.d_model=32", "model.depth=2", "model.n_heads=2", "model.d_ff=64",
    "data.seq_len=32", "data.batch_size=4", "data.vocab_size=4096", "train.progress_bar=false",
)


def make_hf_tokenizer(texts, path, vocab_size: int = 600):
    """Train a tiny byte-level BPE with `tokenizers` (offline) and save it as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.save(str(path))
    return path


def make_tiny_model(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, **changes})


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(**changes) -> ModelConfig` (see the module docstring)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_run():
    """The overrides of a seconds-long training run (a tuple: extend it as `[*tiny_run, ...]`)."""
    return TINY_RUN


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (jax.default_backend() != 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory):
    """One fresh nagjax cache (tokenisers, embedded shards) for the whole session: the first test
    that needs it exercises the first build, later tests and subprocesses reuse it."""
    path = tmp_path_factory.mktemp("nagjax-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("NAGJAX_CACHE_DIR", str(path))
    yield path
    mp.undo()
