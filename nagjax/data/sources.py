"""Where `nagjax data` reads documents from: text, JSONL and Parquet files, or Hugging Face datasets.

Every reader is lazy (a generator over documents, each read as it is needed), so a corpus larger
than memory streams through; files are read in binary and decoded line by line, which also lets the
progress bar count input bytes exactly. Inputs, in the order they are read:

* files and folders (`--input`): `.txt`/`.text`/`.md` (documents separated by two or more blank
  lines), `.jsonl`/`.json` (one JSON object per line, the document in `--text-field`), `.gz`/`.xz`
  compressed versions of both, and `.parquet` (the `--text-field` column; needs pyarrow). Folders
  expand to their supported files, sorted.
* a Hugging Face dataset (`--dataset NAME_OR_PATH`): `datasets.load_dataset(NAME_OR_PATH,
  --dataset-config, split=--dataset-split, data_files=--data-files, streaming=True)`. NAME may be a
  hub dataset, a local folder, or a builder such as `json`/`parquet` with `--data-files`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import os
import pathlib
from collections.abc import Callable, Iterator

from nagjax.data.corpus import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED = {".gz": "gzip", ".xz": "lzma"}
ENCODING_ERRORS = ("strict", "replace", "ignore")
HF_HINT = "pip install 'nagjax[hf]'"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What to read (`nagjax data` flags): local files and/or one Hugging Face dataset."""

    files: tuple[str, ...] = ()
    text_field: str = "text"
    encoding_errors: str = "strict"  # how undecodable UTF-8 bytes in text/JSONL files are handled
    dataset: str = ""
    dataset_config: str = ""
    dataset_split: str = "train"
    data_files: tuple[str, ...] = ()
    streaming: bool = True

    def __post_init__(self):
        if self.encoding_errors not in ENCODING_ERRORS:
            raise DataError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, "
                            f"got {self.encoding_errors!r}")
        if not self.files and not self.dataset:
            raise DataError("no input given: pass --input FILE... and/or --dataset NAME_OR_PATH")

    def describe(self) -> list[str]:
        """What meta.json records as `inputs` (and `rebuild_command` replays)."""
        out = [str(f) for f in expand_inputs(self.files)] if self.files else []
        if self.dataset:
            out.append(f"hf:{self.dataset}" + (f":{self.dataset_config}" if self.dataset_config else "")
                       + f"[{self.dataset_split}]")
        return out

    def dataset_flags(self) -> str:
        """The `nagjax data` flags that name the dataset again ("" without one)."""
        if not self.dataset:
            return ""
        flags = f"--dataset {self.dataset} --dataset-split {self.dataset_split}"
        flags += f" --dataset-config {self.dataset_config}" if self.dataset_config else ""
        flags += f" --data-files {' '.join(self.data_files)}" if self.data_files else ""
        return flags + ("" if self.streaming else " --no-streaming")

    def total_bytes(self) -> int | None:
        """Input bytes on disk (the progress bar's total), None when a dataset is streamed."""
        if self.dataset:
            return None
        return sum(f.stat().st_size for f in expand_inputs(self.files))


class Progress:
    """Counts input bytes consumed (on disk, compressed where the file is)."""

    def __init__(self, callback: Callable[[int], None] | None = None):
        self.done = 0
        self._callback = callback

    def advance(self, n: int) -> None:
        if n > 0:
            self.done += n
            if self._callback is not None:
                self._callback(n)


def documents(inputs: Inputs, progress: Progress | None = None) -> Iterator[str]:
    """Every document of `inputs`, in order (files first, then the dataset), read lazily."""
    progress = progress or Progress()
    if inputs.files:
        for f in expand_inputs(inputs.files):
            yield from read_documents(f, inputs.text_field, inputs.encoding_errors, progress)
    if inputs.dataset:
        yield from dataset_documents(inputs)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def input_kind(path: str | os.PathLike) -> str:
    """ "text", "jsonl" or "parquet" from the file name (compression suffix .gz/.xz ignored)."""
    p = pathlib.Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in TEXT_SUFFIXES:
        return "text"
    if last in PARQUET_SUFFIXES and p.suffix.lower() not in COMPRESSED:
        return "parquet"
    raise DataError(f"{p}: unsupported input type; expected .txt, .jsonl (optionally .gz/.xz) or "
                    ".parquet (or a Hugging Face dataset: --dataset NAME_OR_PATH)")


def _supported(p: pathlib.Path) -> bool:
    try:
        input_kind(p)
        return True
    except DataError:
        return False


def expand_inputs(inputs) -> list[pathlib.Path]:
    """Files as given; directories expand to their supported files, sorted (deterministic order)."""
    files = []
    for item in inputs:
        p = pathlib.Path(item).expanduser()
        if p.is_dir():
            # Bare .json files in a folder are mostly metadata (meta.json, dataset_info.json): a
            # folder contributes .json files only when named one by one.
            found = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f)
                           and f.suffix.lower() != ".json")
            if not found:
                raise DataError(f"input directory {p} holds no .txt/.jsonl(.gz/.xz)/.parquet files "
                                "(.json files count only when given by name)")
            files += found
        elif p.is_file():
            input_kind(p)
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist")
    if not files:
        raise DataError("no input files given")
    return files


def _binary_lines(path: pathlib.Path, progress: Progress) -> Iterator[bytes]:
    """Lines of a (possibly compressed) file as bytes; advances `progress` by the bytes read from
    disk (the compressed position for .gz/.xz)."""
    suffix = path.suffix.lower()
    with open(path, "rb") as raw:
        f = gzip.open(raw) if suffix == ".gz" else lzma.open(raw) if suffix == ".xz" else raw
        last = 0
        for line in f:
            yield line
            pos = raw.tell()
            progress.advance(pos - last)
            last = pos


def _decode(line: bytes, errors: str, path: pathlib.Path, lineno: int) -> str:
    try:
        text = line.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line: "
            f"{line[max(0, e.start - 8):e.start + 8]!r}); pass --encoding-errors replace (bad bytes "
            "become U+FFFD) or --encoding-errors ignore (bad bytes are dropped)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode


def read_documents(path: str | os.PathLike, text_field: str = "text",
                   encoding_errors: str = "strict", progress: Progress | None = None
                   ) -> Iterator[str]:
    """Yield the documents of one input file, lazily.

    Plain text: documents are separated by two or more blank (or whitespace-only) lines; a file
    without any is one document. JSONL: one JSON object per line, the document in `text_field`;
    blank lines skipped. Parquet: the `text_field` column, empty values skipped.
    """
    p = pathlib.Path(path)
    progress = progress or Progress()
    kind = input_kind(p)
    try:
        if kind == "parquet":
            yield from _parquet_documents(p, text_field, progress)
        elif kind == "text":
            yield from _text_documents(p, encoding_errors, progress)
        else:
            yield from _jsonl_documents(p, text_field, encoding_errors, progress)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read input {p}: {e}") from None


def _text_documents(p: pathlib.Path, errors: str, progress: Progress) -> Iterator[str]:
    lines: list[str] = []
    blank_run = 0
    for lineno, raw in enumerate(_binary_lines(p, progress), 1):
        text = _decode(raw, errors, p, lineno)
        for line in text.split("\n")[: -1 if text.endswith("\n") else None]:
            if not line.strip(" \t"):
                blank_run += 1
                if lines:
                    lines.append(line)
                continue
            if blank_run >= 2 and lines:
                yield "\n".join(lines[: len(lines) - blank_run])
                lines = []
            blank_run = 0
            lines.append(line)
    if lines and blank_run < len(lines):
        yield "\n".join(lines[: len(lines) - blank_run])


def _jsonl_documents(p: pathlib.Path, text_field: str, errors: str,
                     progress: Progress) -> Iterator[str]:
    for lineno, raw in enumerate(_binary_lines(p, progress), 1):
        line = _decode(raw, errors, p, lineno)
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{p}:{lineno}: not a JSON object with a string field "
                f"{text_field!r} ({type(e).__name__}: {e}); choose the field with --text-field"
            ) from None
        if not isinstance(text, str):
            raise DataError(f"{p}:{lineno}: field {text_field!r} is not a string")
        if text:
            yield text


def _parquet_documents(p: pathlib.Path, text_field: str, progress: Progress) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {p} needs pyarrow: pip install pyarrow (or {HF_HINT})") from None
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises ArrowInvalid etc. for damaged files
        raise DataError(f"{p} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{p} has no column {text_field!r} (columns: {', '.join(columns)}); "
                        "choose one with --text-field")
    size, rows = p.stat().st_size, max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for i, text in enumerate(batch.column(0).to_pylist()):
            if text is not None and not isinstance(text, str):
                raise DataError(f"{p}: column {text_field!r} holds {type(text).__name__} values "
                                f"(row {i} of a batch), not strings")
            if text:
                yield text
        progress.advance(size * batch.num_rows // rows)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------


def dataset_documents(inputs: Inputs) -> Iterator[str]:
    """The `text_field` of every row of a Hugging Face dataset, streamed (nothing materialised
    when `inputs.streaming`)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset needs the datasets package: {HF_HINT}") from None
    kwargs = {"split": inputs.dataset_split, "streaming": inputs.streaming}
    if inputs.data_files:
        kwargs["data_files"] = list(inputs.data_files)
    name = inputs.dataset
    try:
        ds = datasets.load_dataset(name, inputs.dataset_config or None, **kwargs)
    except Exception as e:  # offline, unknown dataset, bad split: the library's own message
        raise DataError(
            f"cannot load the dataset {name!r} (split {inputs.dataset_split!r}) with "
            f"datasets.load_dataset: {type(e).__name__}: {e}"
        ) from None
    field = inputs.text_field
    for i, row in enumerate(ds):
        if field not in row:
            raise DataError(f"dataset {name!r} has no column {field!r} (columns: "
                            f"{', '.join(row)}); choose one with --text-field")
        text = row[field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"dataset {name!r}, row {i}: column {field!r} is "
                            f"{type(text).__name__}, not a string")
        if text:
            yield text
