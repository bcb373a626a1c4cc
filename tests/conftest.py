"""Shared fixtures. Tests run on CPU; GPU tests are marked `gpu` and skip without a GPU."""

from __future__ import annotations

import jax
import pytest


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
