"""Process-level setup done once before any computation (the CLI calls `setup`)."""

from __future__ import annotations

import os

import jax

from nagjax.data.corpus import cache_dir


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs under the nagjax cache, so a restarted or resumed run, and
    every later run of the same config, skips compilation. Respects a user-set
    `jax_compilation_cache_dir`; `NAGJAX_COMPILATION_CACHE=0` turns it off."""
    if os.environ.get("NAGJAX_COMPILATION_CACHE", "1") == "0":
        return
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup() -> None:
    enable_compilation_cache()
