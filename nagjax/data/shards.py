"""Token shards: text tokenised once into flat on-disk arrays, so iteration never tokenises.

Layout of a shard directory (written by `build_shards` / `nagjax data`):

    DIR/meta.json             format, version, vocab_size, dtype, eos_id, inputs, per-split stats
    DIR/tokenizer.model       the SentencePiece model that produced the tokens (a copy)
    DIR/train-00000.bin       raw little-endian uint16 (vocab <= 65536) or uint32 token ids;
    DIR/validation-00000.bin  documents concatenated, each followed by eos

Per split, meta.json records its files (name, tokens), the token count and the UTF-8 byte count
of the raw document text (eos excluded), which turns a per-token loss into bits per byte.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from nagjax.data import tokenizer as tok
from nagjax.data.corpus import (
    DataError,
    cache_dir,
    corpus_id,
    embedded_documents,
    expand_inputs,
    file_lock,
    read_documents,
)

FORMAT = "nagjax-token-shards"
VERSION = 1
SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 28  # tokens per .bin file before rolling over to the next one
ENCODE_CHUNK_BYTES = 8 << 20  # text encoded per C++ call


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    """One split of a shard directory: memory-mapped token arrays plus what is needed for bpb."""

    name: str
    directory: pathlib.Path
    arrays: tuple[np.ndarray, ...]  # one read-only memmap per file, in order
    n_bytes: int
    n_documents: int
    tokenizer: tok.Tokenizer

    @property
    def n_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    @property
    def tokens(self) -> np.ndarray:
        """The whole split as one array (a memmap when it is a single file, else a copy)."""
        return self.arrays[0] if len(self.arrays) == 1 else np.concatenate(self.arrays)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.n_tokens)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def rebuild_command(out_dir: str | os.PathLike, meta: dict | None = None) -> str:
    """The `nagjax data` command that (re)builds `out_dir`, from its recorded inputs if known."""
    meta = meta or {}
    inputs = " ".join(meta.get("inputs") or ["INPUT..."])
    cmd = f"nagjax data --input {inputs} --output {out_dir}"
    if "vocab_size" in meta:
        cmd += f" --vocab-size {meta['vocab_size']} --val-fraction {meta.get('val_fraction')}"
    return cmd


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _validation_indices(n_docs: int, val_fraction: float) -> set[int]:
    """max(1, round(n * f)) documents spread evenly over the input order (deterministic)."""
    k = max(1, round(n_docs * val_fraction))
    return {i for i in range(n_docs) if (i + 1) * k // n_docs > i * k // n_docs}


def _write_splits(
    tmp_dir: pathlib.Path, labelled_docs: Iterable[tuple[str, str]], tokenizer: tok.Tokenizer
) -> dict:
    """Tokenise (split, document) pairs into rolling .bin files; returns the per-split meta."""
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {s: {"files": [], "tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_bytes = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        docs, st = pending[split], stats[split]
        if not docs:
            return
        ids = tokenizer.encode_batch(docs, add_eos=True)
        flat_t = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids))
        )
        if not st["files"] or st["files"][-1]["tokens"] >= SHARD_TOKENS:
            st["files"].append({"name": f"{split}-{len(st['files']):05d}.bin", "tokens": 0})
        with open(tmp_dir / st["files"][-1]["name"], "ab") as f:
            f.write(flat_t.tobytes())
        st["files"][-1]["tokens"] += len(flat_t)
        st["tokens"] += len(flat_t)
        pending[split], pending_bytes[split] = [], 0

    for split, doc in labelled_docs:
        n = len(doc.encode("utf-8"))
        stats[split]["bytes"] += n
        stats[split]["documents"] += 1
        pending[split].append(doc)
        pending_bytes[split] += n
        if pending_bytes[split] >= ENCODE_CHUNK_BYTES:
            flush(split)
    for split in SPLITS:
        flush(split)
    for split in SPLITS:
        if not stats[split]["tokens"]:
            raise DataError(f"split {split!r} came out empty; give more documents")
    return stats


def _finish(tmp_dir: pathlib.Path, out_dir: pathlib.Path, meta: dict) -> None:
    """Write meta.json last, then move the finished directory into place (replacing an old one)."""
    (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def _tmp_dir(out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _base_meta(tokenizer: tok.Tokenizer) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": "tokenizer.model",
        "tokenizer_sha256": tokenizer.sha256(),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "byte_order": "little",
    }


def build_shards(
    inputs: list[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    text_field: str = "text",
) -> dict:
    """Tokenise text/JSONL files (.gz/.xz ok; directories expand) into a shard directory.

    Every document is assigned to train or validation by its position (an evenly spaced
    `val_fraction` of them, at least one, go to validation). Without `tokenizer`, a BPE model with
    `vocab_size` pieces is trained on the train documents. Built in a temp dir and renamed into
    place, so `out_dir` is either the old complete directory or the new one. Returns meta.json.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out_dir = pathlib.Path(out_dir).expanduser()
    files = expand_inputs(inputs)

    def docs() -> Iterator[str]:
        for f in files:
            yield from read_documents(f, text_field)

    n_docs = sum(1 for _ in docs())
    if n_docs < 2:
        raise DataError(
            f"inputs {[str(f) for f in files]} hold {n_docs} document(s); need >= 2 to "
            "hold out validation (separate documents by two blank lines, or use JSONL)"
        )
    val_idx = _validation_indices(n_docs, val_fraction)

    def labelled() -> Iterator[tuple[str, str]]:
        for i, d in enumerate(docs()):
            yield ("validation" if i in val_idx else "train"), d

    tmp = _tmp_dir(out_dir)
    try:
        model_path = tmp / "tokenizer.model"
        if tokenizer:
            tk = tok.copy_tokenizer(tok.load_tokenizer(tokenizer), model_path)
        else:
            train_docs = (d for s, d in labelled() if s == "train")
            tk = tok.train_tokenizer(train_docs, model_path, vocab_size, files=False)
        meta = _base_meta(tk)
        meta.update(
            inputs=[str(f) for f in files],
            text_field=text_field,
            val_fraction=val_fraction,
            splits=_write_splits(tmp, labelled(), tk),
        )
        _finish(tmp, out_dir, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def run_data_command(
    inputs: list[str],
    output: str,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    text_field: str = "text",
) -> dict:
    """`nagjax data`: build shards and print a short summary (what the CLI calls)."""
    meta = build_shards(
        inputs,
        output,
        tokenizer=tokenizer or None,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        text_field=text_field,
    )
    print(
        f"wrote {output}: {len(meta['inputs'])} input file(s), vocab_size={meta['vocab_size']}, "
        f"dtype={meta['dtype']}"
    )
    for split in SPLITS:
        s = meta["splits"][split]
        print(
            f"  {split:<10} {s['documents']:>9,} docs {s['tokens']:>13,} tokens "
            f"{s['bytes']:>14,} bytes  ({s['bytes'] / s['tokens']:.2f} bytes/token)"
        )
    print(f"use it with: data.source={output}")
    return meta


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_meta(directory: str | os.PathLike) -> dict:
    d = pathlib.Path(directory).expanduser()
    path = d / "meta.json"
    if not d.is_dir():
        raise DataError(
            f"token-shard directory {d} does not exist; build it with "
            f"{rebuild_command(d)} (or use data.source=embedded)"
        )
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing (unfinished or not a shard directory); "
            f"rebuild with {rebuild_command(d)}"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is corrupt ({e}); rebuild with {rebuild_command(d)}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}; rebuild with {rebuild_command(d, meta)}"
        )
    return meta


def open_shards(directory: str | os.PathLike, split: str, tokenizer: str = "") -> TokenSplit:
    """Open and validate one split of a shard directory (`tokenizer`, if set, must be its model)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = pathlib.Path(directory).expanduser()
    meta = read_meta(d)
    hint = f"rebuild with {rebuild_command(d, meta)}"
    try:
        tk = tok.load_tokenizer(d / meta["tokenizer"])
        if tk.vocab_size != meta["vocab_size"] or tk.sha256() != meta["tokenizer_sha256"]:
            raise DataError(
                f"{tk.path} (vocab_size {tk.vocab_size}) is not the tokenizer recorded in "
                f"{d / 'meta.json'} (vocab_size {meta['vocab_size']}); {hint}"
            )
        if tokenizer and tok.load_tokenizer(tokenizer).sha256() != meta["tokenizer_sha256"]:
            raise DataError(
                f"data.tokenizer={tokenizer} is not the tokenizer the shards in {d} were "
                f"built with ({tk.path}); leave data.tokenizer empty, or {hint} "
                f"--tokenizer {tokenizer}"
            )
        info = meta["splits"][split]
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        arrays = []
        for f in info["files"]:
            path = d / f["name"]
            size = path.stat().st_size if path.is_file() else None
            if size != f["tokens"] * dtype.itemsize:
                raise DataError(
                    f"token file {path} has {size} bytes, meta.json says "
                    f"{f['tokens']} tokens x {dtype.itemsize} bytes; {hint}"
                )
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(f["tokens"],)))
    except (KeyError, TypeError) as e:
        raise DataError(f"{d / 'meta.json'} lacks field {e}; {hint}") from None
    if not arrays or sum(len(a) for a in arrays) == 0:
        raise DataError(f"split {split!r} of {d} is empty; {hint}")
    return TokenSplit(split, d, tuple(arrays), int(info["bytes"]), int(info["documents"]), tk)


def embedded_shards_dir(data_cfg) -> pathlib.Path:
    """Shards of the embedded corpus for this config's tokeniser; built and cached on first use."""
    tk = (
        tok.load_tokenizer(data_cfg.tokenizer)
        if data_cfg.tokenizer
        else (tok.embedded_tokenizer(data_cfg.vocab_size))
    )
    out = cache_dir() / "shards" / f"embedded-{corpus_id()}-{tk.sha256()[:12]}"
    with file_lock(out):
        if out.is_dir():
            try:
                for split in SPLITS:
                    open_shards(out, split)
                return out
            except DataError as e:
                print(f"nagjax: rebuilding the embedded-corpus cache {out}: {e}", file=sys.stderr)
        tmp = _tmp_dir(out)
        try:
            model = tok.copy_tokenizer(tk, tmp / "tokenizer.model")
            labelled = ((s, d) for s in SPLITS for d in embedded_documents(s))
            meta = _base_meta(model)
            meta.update(inputs=["embedded"], splits=_write_splits(tmp, labelled, model))
            _finish(tmp, out, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def open_split(data_cfg, split: str) -> TokenSplit:
    """The tokens of `split` for a DataConfig: the embedded corpus or a shard directory."""
    if data_cfg.source == "embedded":
        return open_shards(embedded_shards_dir(data_cfg), split)
    return open_shards(data_cfg.source, split, data_cfg.tokenizer)
