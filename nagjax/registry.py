"""Experiments registered by name.

An experiment is a function in `experiments/*.py` that returns a `Config`, decorated with
`@experiment`. The built-in experiments install as the `nagjax_experiments` package; users add their
own files with `--experiments-dir DIR` or the `NAGJAX_EXPERIMENTS` environment variable (folders or
.py files, separated by the OS path separator).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nagjax.config import Config, ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "experiment" or "sweep"
    build: Callable[[], object]
    description: str
    source: str


_REGISTRY: dict[str, Entry] = {}
_loaded_paths: set[str] = set()
_builtins_loaded = False


def _register(kind: str, fn: Callable, name: str | None, description: str | None) -> Callable:
    key = name or fn.__name__
    doc = description or (fn.__doc__ or "").strip().splitlines()[0:1]
    desc = doc if isinstance(doc, str) else (doc[0] if doc else "")
    existing = _REGISTRY.get(key)
    source = f"{fn.__module__}.{fn.__qualname__}"
    if existing is not None and existing.source != source:
        raise ValueError(f"{kind} {key!r} registered twice: {existing.source} and {source}")
    _REGISTRY[key] = Entry(key, kind, fn, desc, source)
    return fn


def experiment(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Register `fn() -> Config` as an experiment (name defaults to the function's name)."""
    if fn is None:
        return lambda f: _register("experiment", f, name, description)
    return _register("experiment", fn, name, description)


def sweep(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Register `fn()` returning a sweep definition (used by `nagjax sweep`)."""
    if fn is None:
        return lambda f: _register("sweep", f, name, description)
    return _register("sweep", fn, name, description)


def _load_file(path: Path) -> None:
    key = str(path.resolve())
    if key in _loaded_paths:
        return
    module_name = "nagjax_user_experiments." + path.stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import experiment file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    _loaded_paths.add(key)


def load_experiments(extra_paths: list[str] | tuple[str, ...] = ()) -> None:
    """Import the built-in experiments, then user files/folders (args and $NAGJAX_EXPERIMENTS)."""
    global _builtins_loaded
    if not _builtins_loaded:
        package = importlib.import_module("nagjax_experiments")
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"nagjax_experiments.{info.name}")
        _builtins_loaded = True
    env = [p for p in os.environ.get("NAGJAX_EXPERIMENTS", "").split(os.pathsep) if p]
    for raw in [*env, *extra_paths]:
        path = Path(raw).expanduser()
        if path.is_dir():
            for file in sorted(path.glob("*.py")):
                if not file.name.startswith("_"):
                    _load_file(file)
        elif path.is_file() and path.suffix == ".py":
            _load_file(path)
        else:
            raise FileNotFoundError(f"experiments path {raw!r} is neither a folder nor a .py file")


def _lookup(name: str, kind: str) -> Entry:
    entry = _REGISTRY.get(name)
    if entry is None or entry.kind != kind:
        names = sorted(n for n, e in _REGISTRY.items() if e.kind == kind)
        hint = difflib.get_close_matches(name, names, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"unknown {kind} {name!r}{extra} (`nagjax list` shows them all)")
    return entry


def get_experiment(name: str) -> Config:
    entry = _lookup(name, "experiment")
    config = entry.build()
    if not isinstance(config, Config):
        raise TypeError(f"experiment {name!r} ({entry.source}) must return a nagjax Config")
    return dataclasses.replace(config, name=name, description=config.description or entry.description).validate()


def get_sweep(name: str):
    return _lookup(name, "sweep").build()


def entries(kind: str | None = None) -> list[Entry]:
    return sorted((e for e in _REGISTRY.values() if kind is None or e.kind == kind), key=lambda e: e.name)
