"""Building a shard folder (`nagjax data`): documents streamed, tokenised in parallel, written in order.

Memory stays bounded whatever the corpus size: documents are read lazily (sources.py), grouped into
chunks of about `CHUNK_CHARS` characters, and at most `2 * workers` chunks are in flight in the
worker processes; results are written in submission order, so the output is the same for any
`workers` (0 tokenises in this process).

Splits: document i (0-based, in input order) goes to validation iff i == 0 or
floor(i * f) > floor((i - 1) * f), f = `val_fraction`: an evenly spaced share f of the documents,
at least one, decided without knowing how many documents there are (streaming).

Parts (`--shard-index I --num-shards N`, N machines building one folder): part I tokenises the
documents with i % N == I (every part reads the whole input and skips the others' documents) and
writes them, complete, to `OUT/part-0000I-of-0000N/` (a shard folder of its own, renamed into place
when finished). The reader (shards.py) accepts a folder of parts once all N are complete and
concatenates them in part order: the same documents, tokens and byte counts as a one-part build,
with the documents in a different order (training shuffles windows anyway). Every part must use
the same tokeniser, so N > 1 needs `--tokenizer`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fractions
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from nagjax.data import sources, tokenizer as tok
from nagjax.data.corpus import DataError
from nagjax.data.shards import (FORMAT, SPLITS, VERSION, base_meta, finish_dir, part_name, tmp_dir,
                                token_dtype)

CHUNK_CHARS = 4 << 20  # characters of text per encode call / worker task
SHARD_TOKENS = 1 << 28  # tokens per .bin file before rolling over to the next one


def is_validation(index: int, val_fraction: float) -> bool:
    """Whether document `index` is held out (see the module docstring); exact rational math."""
    f = fractions.Fraction(repr(val_fraction)).limit_denominator(10**9)
    return index == 0 or (index * f.numerator) // f.denominator > (
        (index - 1) * f.numerator) // f.denominator


@dataclasses.dataclass
class SplitStats:
    files: list = dataclasses.field(default_factory=list)
    tokens: int = 0
    bytes: int = 0
    documents: int = 0


class SplitWriter:
    """Appends token chunks of one split to rolling `<split>-NNNNN.bin` files."""

    def __init__(self, directory: pathlib.Path, split: str):
        self.directory, self.split, self.stats = directory, split, SplitStats()

    def write(self, tokens: np.ndarray, n_bytes: int, n_documents: int) -> None:
        st = self.stats
        if not st.files or st.files[-1]["tokens"] >= SHARD_TOKENS:
            st.files.append({"name": f"{self.split}-{len(st.files):05d}.bin", "tokens": 0})
        with open(self.directory / st.files[-1]["name"], "ab") as f:
            f.write(tokens.tobytes())
        st.files[-1]["tokens"] += len(tokens)
        st.tokens += len(tokens)
        st.bytes += n_bytes
        st.documents += n_documents


# ---------------------------------------------------------------------------------------------
# Tokenising chunks (in this process or in workers)
# ---------------------------------------------------------------------------------------------

_worker_tokenizer: tok.Tokenizer | None = None


def _init_worker(path: str, eos_token: str | None) -> None:
    global _worker_tokenizer
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker for Hugging Face tokenizers
    _worker_tokenizer = tok.load_tokenizer(path, eos_token=eos_token)


def encode_chunk(docs: list[str], tokenizer: tok.Tokenizer | None = None, num_threads: int = 1
                 ) -> tuple[np.ndarray, int]:
    """(flat token array with eos after every document, UTF-8 bytes of the documents)."""
    tk = tokenizer or _worker_tokenizer
    ids = tk.encode_batch(docs, add_eos=True, num_threads=num_threads)
    flat = np.fromiter((i for doc in ids for i in doc), dtype=token_dtype(tk.vocab_size),
                       count=sum(map(len, ids)))
    return flat, sum(len(d.encode("utf-8")) for d in docs)


class Encoder:
    """Ordered, bounded encoding: `submit(split, docs)`, results delivered to `sink` in order."""

    def __init__(self, tokenizer: tok.Tokenizer, workers: int, sink):
        self.tokenizer, self.sink = tokenizer, sink
        self.pool = None
        if workers > 0:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(str(tokenizer.path), tokenizer.eos_token))
        self.max_in_flight = 2 * max(1, workers)
        self.in_flight: collections.deque = collections.deque()

    def submit(self, split: str, docs: list[str]) -> None:
        if self.pool is None:
            self.sink(split, len(docs), *encode_chunk(docs, self.tokenizer, num_threads=0))
            return
        while len(self.in_flight) >= self.max_in_flight:
            self._drain_one()
        self.in_flight.append((split, len(docs), self.pool.submit(encode_chunk, docs)))

    def _drain_one(self) -> None:
        split, n_docs, future = self.in_flight.popleft()
        self.sink(split, n_docs, *future.result())

    def close(self) -> None:
        while self.in_flight:
            self._drain_one()
        if self.pool is not None:
            self.pool.shutdown()

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def write_splits(directory: pathlib.Path, labelled_docs: Iterable[tuple[str, str]],
                 tokenizer: tok.Tokenizer, workers: int = 0) -> dict:
    """Tokenise (split, document) pairs into `directory`; returns meta.json's `splits`."""
    writers = {s: SplitWriter(directory, s) for s in SPLITS}
    encoder = Encoder(tokenizer, workers,
                      lambda split, n_docs, tokens, n_bytes: writers[split].write(tokens, n_bytes, n_docs))
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_chars = dict.fromkeys(SPLITS, 0)
    try:
        for split, doc in labelled_docs:
            pending[split].append(doc)
            pending_chars[split] += len(doc)
            if pending_chars[split] >= CHUNK_CHARS:
                encoder.submit(split, pending[split])
                pending[split], pending_chars[split] = [], 0
        for split in SPLITS:
            if pending[split]:
                encoder.submit(split, pending[split])
        encoder.close()
    except BaseException:
        encoder.abort()
        raise
    return {s: dataclasses.asdict(w.stats) for s, w in writers.items()}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build_shards(
    inputs: sources.Inputs | list[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    eos_token: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    text_field: str = "text",
    workers: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = False,
) -> dict:
    """Tokenise `inputs` into a shard folder (or, with num_shards > 1, one part of it).

    Without `tokenizer`, a SentencePiece BPE with `vocab_size` pieces is trained on the train
    documents (the first 256 MiB). Built in a temp dir and renamed into place, so the output is
    either the old complete folder or the new one. Returns the written meta.json.
    """
    if isinstance(inputs, (list, tuple)):
        inputs = sources.Inputs(files=tuple(inputs), text_field=text_field)
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} must be in [0, --num-shards={num_shards})")
    if num_shards > 1 and not tokenizer:
        raise DataError("--num-shards > 1 needs --tokenizer (every part must use the same one): "
                        "train one first, e.g. `nagjax data --input SAMPLE --output shards/sample "
                        "--vocab-size 32000`, then pass --tokenizer shards/sample/tokenizer.model")
    out_dir = pathlib.Path(out_dir).expanduser()
    target = out_dir / part_name(shard_index, num_shards) if num_shards > 1 else out_dir
    if num_shards > 1 and (out_dir / "meta.json").is_file():
        raise DataError(f"{out_dir} holds a one-part shard folder; write the parts elsewhere")
    described = inputs.describe()

    def labelled():
        for i, doc in enumerate(sources.documents(inputs, reader_progress)):
            if i % num_shards == shard_index:
                yield ("validation" if is_validation(i, val_fraction) else "train"), doc

    tmp = tmp_dir(target)
    bar = tqdm(total=inputs.total_bytes(), unit="B", unit_scale=True, desc="tokenising",
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True)
    reader_progress = sources.Progress(bar.update)
    try:
        if tokenizer:
            tk = tok.load_tokenizer(tokenizer, eos_token=eos_token).copy_to(tmp)
        else:
            seen, failed = [0], []

            def train_docs():  # SentencePiece swallows errors raised inside its input iterator
                try:
                    for i, d in enumerate(sources.documents(inputs)):
                        seen[0] = i + 1
                        if not is_validation(i, val_fraction):
                            yield d
                except DataError as e:
                    failed.append(e)

            try:
                tk = tok.train_tokenizer(train_docs(), tmp / tok.SentencePieceTokenizer.filename,
                                         vocab_size, files=False)
            except DataError:
                if failed:
                    raise failed[0] from None
                if seen[0] < 2:
                    raise _too_few(described, seen[0]) from None
                raise
            if failed:
                raise failed[0]
        t0 = time.perf_counter()
        splits = write_splits(tmp, labelled(), tk, workers)
        seconds = time.perf_counter() - t0
        if not splits["train"]["tokens"]:
            raise _too_few(described, splits["validation"]["documents"])
        meta = base_meta(tk)
        meta.update(inputs=described, dataset_flags=inputs.dataset_flags(),
                    text_field=inputs.text_field, val_fraction=val_fraction,
                    splits=splits, part={"index": shard_index, "count": num_shards},
                    build={"seconds": round(seconds, 3), "input_bytes": reader_progress.done,
                           "workers": workers})
        finish_dir(tmp, target, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return meta


def _too_few(described: list[str], n_docs: int) -> DataError:
    return DataError(f"inputs {described} hold {n_docs} document(s) (for this part); need >= 2 to "
                     "hold out validation (separate documents by two blank lines, or use JSONL)")


def run_data_command(inputs: sources.Inputs, output: str, *, tokenizer: str | None = None,
                     eos_token: str | None = None, vocab_size: int = 4096,
                     val_fraction: float = 0.01, workers: int = 0, shard_index: int = 0,
                     num_shards: int = 1, progress: bool = True) -> dict:
    """`nagjax data`: build shards and print a short summary with the throughput."""
    meta = build_shards(inputs, output, tokenizer=tokenizer or None, eos_token=eos_token,
                        vocab_size=vocab_size, val_fraction=val_fraction, workers=workers,
                        shard_index=shard_index, num_shards=num_shards, progress=progress)
    where = output if num_shards == 1 else f"{output}/{part_name(shard_index, num_shards)}"
    print(f"wrote {where}: {len(meta['inputs'])} input(s), {meta['tokenizer_kind']} tokenizer, "
          f"vocab_size={meta['vocab_size']}, dtype={meta['dtype']}")
    text_bytes = 0
    for split in SPLITS:
        s = meta["splits"][split]
        text_bytes += s["bytes"]
        print(f"  {split:<10} {s['documents']:>9,} docs {s['tokens']:>13,} tokens "
              f"{s['bytes']:>14,} bytes  ({s['bytes'] / s['tokens']:.2f} bytes/token)")
    b = meta["build"]
    seconds = max(b["seconds"], 1e-9)
    tokens = sum(meta["splits"][s]["tokens"] for s in SPLITS)
    print(f"  {text_bytes / 1e6:,.1f} MB of text in {seconds:.1f} s: {text_bytes / 1e6 / seconds:,.2f} MB/s, "
          f"{tokens / seconds:,.0f} tokens/s ({workers or 'no'} worker processes)")
    if num_shards > 1:
        print(f"part {shard_index + 1} of {num_shards}; once all parts are built, use it with: "
              f"data.source={output}")
    else:
        print(f"use it with: data.source={output}")
    return meta


__all__ = ["FORMAT", "VERSION", "build_shards", "is_validation", "run_data_command", "write_splits"]
