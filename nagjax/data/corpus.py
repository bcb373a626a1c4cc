"""The embedded corpus: public-domain English prose shipped inside the package.

It lets every config train and evaluate offline with no data step. The train/validation split is
fixed at build time (`scripts/build_embedded_corpus.py`) and shipped as two xz files, so it is the
same on every machine. Documents are separated by two blank lines (`DOC_SEP`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import pathlib

CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "corpus"
SPLITS = ("train", "validation")
DOC_SEP = "\n\n\n"
REBUILD_CORPUS = "python scripts/build_embedded_corpus.py (or reinstall nagjax)"


class DataError(ValueError):
    """Data is missing, corrupt or inconsistent; the message names the file and how to rebuild."""


def cache_dir() -> pathlib.Path:
    """Where derived data (tokenisers, token shards) lives: $NAGJAX_CACHE_DIR or ~/.cache/nagjax."""
    env = os.environ.get("NAGJAX_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "nagjax"


def manifest() -> dict:
    """Sizes and sha256 of the shipped splits (written by the build script)."""
    path = CORPUS_DIR / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"embedded corpus manifest {path} is missing or corrupt ({e}); "
            f"rebuild with {REBUILD_CORPUS}"
        ) from None


def corpus_id() -> str:
    """Short content hash of the embedded corpus; keys the caches built from it."""
    m = manifest()["splits"]
    return hashlib.sha256("".join(m[s]["sha256"] for s in SPLITS).encode()).hexdigest()[:12]


def embedded_text(split: str) -> str:
    """The whole text of one split ("train" or "validation"), checked against the manifest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = manifest()["splits"][split]
    path = CORPUS_DIR / entry["file"]
    try:
        raw = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise DataError(
            f"embedded corpus file {path} is missing or corrupt ({e}); "
            f"rebuild with {REBUILD_CORPUS}"
        ) from None
    if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise DataError(
            f"embedded corpus file {path} does not match {CORPUS_DIR / 'manifest.json'} "
            f"(size or sha256 differ); rebuild with {REBUILD_CORPUS}"
        )
    return raw.decode("utf-8")


def embedded_documents(split: str) -> list[str]:
    """The split as a list of documents (chapters)."""
    return [d for d in embedded_text(split).strip("\n").split(DOC_SEP) if d]


# ---------------------------------------------------------------------------------------------
# Cache locking (readers of user inputs live in sources.py)
# ---------------------------------------------------------------------------------------------


class file_lock:
    """Exclusive inter-process lock on `path` (+".lock"), so concurrent runs build a cache once."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(str(path) + ".lock")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w")
        fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()
