"""Token shards: text tokenised once into flat on-disk arrays, so iteration never tokenises.

Layout of a shard folder (written by `nagjax data`, build.py):

    DIR/meta.json             format, version, tokenizer (file, kind, sha256, eos), vocab_size,
                              dtype, inputs, per-split stats
    DIR/tokenizer.model       the tokeniser that produced the tokens (a copy): SentencePiece
      or DIR/tokenizer.json   .model or Hugging Face tokenizer.json
    DIR/train-00000.bin       raw little-endian uint16 (vocab <= 65536) or uint32 token ids;
    DIR/validation-00000.bin  documents concatenated, each followed by eos

Per split, meta.json records its files (name, tokens), the token count and the UTF-8 byte count
of the raw document text (eos excluded), which turns a per-token loss into bits per byte.

A folder built by N machines (`--num-shards N`) holds instead `DIR/part-0000I-of-0000N/`, each a
shard folder as above; it is read as one once all N parts are complete (in part order), and an
incomplete one is an error naming the missing parts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np

from nagjax.data import tokenizer as tok
from nagjax.data.corpus import DataError

FORMAT = "nagjax-token-shards"
VERSION = 1
SPLITS = ("train", "validation")


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
    recorded = meta.get("inputs") or ["INPUT..."]
    files = [i for i in recorded if not i.startswith("hf:")]
    cmd = "nagjax data" + (f" --input {' '.join(files)}" if files else "")
    cmd += (f" {meta['dataset_flags']}" if meta.get("dataset_flags") else "") + f" --output {out_dir}"
    if "vocab_size" in meta:
        cmd += f" --vocab-size {meta['vocab_size']} --val-fraction {meta.get('val_fraction')}"
    return cmd


# ---------------------------------------------------------------------------------------------
# Writing helpers (the builder is build.py)
# ---------------------------------------------------------------------------------------------


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def finish_dir(tmp_dir: pathlib.Path, out_dir: pathlib.Path, meta: dict) -> None:
    """Write meta.json last, then move the finished directory into place (replacing an old one)."""
    (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def tmp_dir(out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def base_meta(tokenizer: tok.Tokenizer) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer.filename,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer.sha256(),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "eos_token": tokenizer.eos_token,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "byte_order": "little",
    }


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


def part_dirs(directory: pathlib.Path) -> list[pathlib.Path] | None:
    """The part folders of a multi-part shard folder in order (None: not one); DataError naming
    the missing or unfinished parts."""
    if (directory / "meta.json").exists() or not directory.is_dir():
        return None
    found = {}
    for p in directory.glob("part-*-of-*"):
        try:
            index, count = (int(x) for x in p.name[len("part-"):].split("-of-"))
        except ValueError:
            continue
        found.setdefault(count, {})[index] = p
    if not found:
        return None
    if len(found) > 1:
        raise DataError(f"{directory} mixes parts of builds with different --num-shards "
                        f"({sorted(found)}); remove the stale ones")
    count, parts = next(iter(found.items()))
    missing = [i for i in range(count) if i not in parts or not (parts[i] / "meta.json").is_file()]
    if missing:
        raise DataError(
            f"{directory} is a {count}-part shard folder with part(s) {missing} missing or "
            f"unfinished; build each with `nagjax data ... --output {directory} --tokenizer TOK "
            f"--shard-index I --num-shards {count}`"
        )
    return [parts[i] for i in range(count)]


def _open_part(d: pathlib.Path, split: str, tokenizer: str):
    meta = read_meta(d)
    hint = f"rebuild with {rebuild_command(d, meta)}"
    try:
        tk = tok.load_tokenizer(d / meta["tokenizer"], eos_token=meta.get("eos_token"))
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
    return meta, tk, arrays, int(info["bytes"]), int(info["documents"])


def open_shards(directory: str | os.PathLike, split: str, tokenizer: str = "") -> TokenSplit:
    """Open and validate one split of a shard folder (or of all parts of a multi-part one);
    `tokenizer`, if set, must be the one it was built with."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = pathlib.Path(directory).expanduser()
    parts = part_dirs(d) or [d]
    arrays, n_bytes, n_docs, tk, first = [], 0, 0, None, None
    for part in parts:
        meta, part_tk, part_arrays, b, n = _open_part(part, split, tokenizer)
        if first is None:
            first, tk = part, part_tk
        elif part_tk.sha256() != tk.sha256():
            raise DataError(f"{part} was built with another tokenizer than {first} "
                            "(all parts of a shard folder must share one; pass the same --tokenizer)")
        arrays += part_arrays
        n_bytes += b
        n_docs += n
    if not arrays or sum(len(a) for a in arrays) == 0:
        raise DataError(f"split {split!r} of {d} is empty; rebuild with {rebuild_command(d)}")
    return TokenSplit(split, d, tuple(arrays), n_bytes, n_docs, tk)
