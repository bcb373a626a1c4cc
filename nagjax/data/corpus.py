"""The embedded corpus: public-domain English prose shipped inside the package.

It lets every config train and evaluate offline with no data step. The train/validation split is
fixed at build time (`scripts/build_embedded_corpus.py`) and shipped as two xz files, so it is the
same on every machine. Documents are separated by two blank lines (`DOC_SEP`).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import pathlib
import re

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
# User text inputs and cache locking
# ---------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED = {".gz": "gzip", ".xz": "lzma"}


def _open_text(path: pathlib.Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def input_kind(path: str | os.PathLike) -> str:
    """ "text" or "jsonl" from the file name (compression suffix .gz/.xz ignored)."""
    p = pathlib.Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in TEXT_SUFFIXES:
        return "text"
    raise DataError(f"{p}: unsupported input type; expected .txt or .jsonl (optionally .gz/.xz)")


def expand_inputs(inputs: list[str]) -> list[pathlib.Path]:
    """Files as given; directories expand to their supported files, sorted (deterministic order)."""
    files = []
    for item in inputs:
        p = pathlib.Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f))
            if not found:
                raise DataError(f"input directory {p} holds no .txt/.jsonl(.gz/.xz) files")
            files += found
        elif p.is_file():
            input_kind(p)
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist")
    if not files:
        raise DataError("no input files given")
    return files


def _supported(p: pathlib.Path) -> bool:
    try:
        input_kind(p)
        return True
    except DataError:
        return False


def read_documents(path: str | os.PathLike, text_field: str = "text"):
    """Yield the documents of one input file.

    Plain text: documents are separated by two or more blank lines (a file without any is one
    document). JSONL: one JSON object per line, the document in `text_field`; blank lines skipped.
    """
    p = pathlib.Path(path)
    kind = input_kind(p)
    try:
        with _open_text(p) as f:
            if kind == "text":
                yield from _split_docs(f.read())
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(
                        f"{p}:{lineno}: not a JSON object with a string field "
                        f"{text_field!r} ({type(e).__name__}: {e})"
                    ) from None
                if not isinstance(text, str):
                    raise DataError(f"{p}:{lineno}: field {text_field!r} is not a string")
                if text:
                    yield text
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read input {p}: {e}") from None


def _split_docs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    return [d.strip("\n") for d in re.split(r"\n[ \t]*\n[ \t]*\n+", text) if d.strip()]


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
