"""SentencePiece BPE tokeniser: trained by us, so nothing is downloaded at run time.

Settings are chosen so that decode(encode(text)) == text for any string: identity normalisation,
no dummy prefix, whitespace kept as is, newline as its own piece, and byte fallback for characters
outside the vocabulary. Ids: 0 = <unk>, 1 = <s> (bos), 2 = </s> (eos, the document separator).
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from nagjax.data.corpus import (
    DataError,
    cache_dir,
    corpus_id,
    embedded_documents,
    expand_inputs,
    file_lock,
    read_documents,
)

TRAINER_VERSION = 1  # bump when the trainer settings change: keys the embedded tokeniser cache
MAX_SENTENCES = 1_000_000  # lines sampled for training; keeps training to seconds on big inputs
MAX_TRAIN_BYTES = 256 << 20  # only the first 256 MiB of text is read for training
REBUILD_HINT = (
    "nagjax data --input FILE... --output DIR (trains a tokeniser into DIR/tokenizer.model)"
)


class Tokenizer:
    """A loaded SentencePiece model; `encode` adds no bos/eos (the shard builder appends eos)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._sp = load_processor(self.path)
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(
        self, texts: list[str], *, add_eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """Encode many documents in C++ threads (0 = all cores), optionally appending eos."""
        return self._sp.encode(
            texts, add_eos=add_eos, num_threads=num_threads or (os.cpu_count() or 1)
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_processor(path: pathlib.Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist; build one with {REBUILD_HINT}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"tokenizer file {path} is corrupt or not a SentencePiece model ({e}); "
            f"delete it and rebuild with {REBUILD_HINT}"
        ) from None
    if sp.eos_id() < 0:
        raise DataError(
            f"tokenizer file {path} has no </s> (eos) piece, needed to separate documents"
        )
    return sp


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a .model file; DataError naming the file and the rebuild command if missing/corrupt."""
    return Tokenizer(path)


def _sentences(source: Iterable[str] | Iterable[os.PathLike], files: bool | None) -> Iterator[str]:
    """Non-empty lines of the documents; items are read as input files when `files` says so
    (None: Path objects, and strs naming an existing file). Stops after MAX_TRAIN_BYTES."""
    n_bytes = 0
    for item in source:
        is_file = (
            files
            if files is not None
            else (
                isinstance(item, os.PathLike)
                or ("\n" not in item and len(item) < 4096 and os.path.isfile(item))
            )
        )
        docs = (
            (d for f in expand_inputs([str(item)]) for d in read_documents(f))
            if is_file
            else [item]
        )
        for doc in docs:
            for line in doc.split("\n"):
                if line.strip():
                    yield line
            n_bytes += len(doc)
            if n_bytes >= MAX_TRAIN_BYTES:
                return


def train_tokenizer(
    texts_or_files: Iterable[str] | Iterable[os.PathLike],
    model_path: str | os.PathLike,
    vocab_size: int,
    *,
    files: bool | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Train a byte-fallback BPE model and write it atomically (temp file, then rename).

    `texts_or_files` yields document strings or paths of input files (.txt/.jsonl, .gz/.xz);
    `files=False/True` says which, None guesses per item. Deterministic for a given input and seed.
    """
    model_path = pathlib.Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts_or_files, files),
            model_writer=proto,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            max_sentence_length=1 << 16,
            input_sentence_size=MAX_SENTENCES,
            shuffle_input_sentence=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=min(2, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"training a {vocab_size}-piece tokenizer for {model_path} failed: {e} "
            "(too little text for this vocab_size? lower it)"
        ) from None
    tmp = model_path.with_name(f".{model_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(proto.getvalue())
    os.replace(tmp, model_path)
    return Tokenizer(model_path)


def embedded_tokenizer_path(vocab_size: int) -> pathlib.Path:
    return (
        cache_dir()
        / "tokenizers"
        / f"embedded-{corpus_id()}-v{TRAINER_VERSION}-bpe{vocab_size}.model"
    )


def embedded_tokenizer(vocab_size: int) -> Tokenizer:
    """The tokeniser of the embedded corpus's train split, trained on first use and cached."""
    path = embedded_tokenizer_path(vocab_size)
    with file_lock(path):
        if path.is_file():
            try:
                return Tokenizer(path)
            except DataError:
                path.unlink()  # a cache entry: rebuild it rather than fail
        return train_tokenizer(embedded_documents("train"), path, vocab_size, files=False)


def copy_tokenizer(src: Tokenizer, dst: str | os.PathLike) -> Tokenizer:
    shutil.copyfile(src.path, dst)
    return Tokenizer(dst)
