"""Tokenisers: one interface, two implementations.

* SentencePiece (`.model`): trained by us, so nothing is downloaded at run time. Settings are chosen
  so that decode(encode(text)) == text for any string: identity normalisation, no dummy prefix,
  whitespace kept as is, newline as its own piece, and byte fallback for characters outside the
  vocabulary. Ids: 0 = <unk>, 1 = <s> (bos), 2 = </s> (eos, the document separator).
* Hugging Face `tokenizers` (`tokenizer.json`, a local file, a folder holding one, or a hub name):
  an existing tokeniser brought by the user. Its eos (the document separator) is the `eos_token`
  of a `tokenizer_config.json` beside it, else the first special token with a usual eos name.

Both expose `encode` (no bos/eos added), `encode_batch`, `decode`, `eos_id`, `bos_id`,
`vocab_size`, `path` (the file that defines it) and `sha256`; a shard folder keeps a copy of that
file under `filename` ("tokenizer.model" or "tokenizer.json").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from nagjax.data import sources
from nagjax.data.corpus import DataError, cache_dir, corpus_id, embedded_documents, file_lock

TRAINER_VERSION = 1  # bump when the trainer settings change: keys the embedded tokeniser cache
MAX_SENTENCES = 1_000_000  # lines sampled for training; keeps training to seconds on big inputs
MAX_TRAIN_BYTES = 256 << 20  # only the first 256 MiB of text is read for training
REBUILD_HINT = (
    "nagjax data --input FILE... --output DIR (trains a tokeniser into DIR/tokenizer.model)"
)
# Special tokens taken as the document separator of a `tokenizers` tokeniser without a config.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")


class Tokenizer:
    """The interface every tokeniser implements (see the module docstring)."""

    kind: str
    filename: str
    path: pathlib.Path
    vocab_size: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(
        self, texts: list[str], *, add_eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """Encode many documents (0 threads = all cores), optionally appending eos to each."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def copy_to(self, directory: str | os.PathLike) -> Tokenizer:
        """Copy the defining file into `directory` (as `filename`) and load the copy."""
        dst = pathlib.Path(directory) / self.filename
        shutil.copyfile(self.path, dst)
        return load_tokenizer(dst, eos_token=self.eos_token)

    @property
    def eos_token(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model; `encode` adds no bos/eos (the shard builder appends eos)."""

    kind, filename = "sentencepiece", "tokenizer.model"

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._sp = load_processor(self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts, *, add_eos=False, num_threads=0):
        return self._sp.encode(
            texts, add_eos=add_eos, num_threads=num_threads or (os.cpu_count() or 1)
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json. `encode` adds no special tokens (no template)."""

    kind, filename = "huggingface", "tokenizer.json"

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer file {self.path} does not exist")
        try:
            self._tk = RustTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exceptions for bad JSON
            raise DataError(
                f"tokenizer file {self.path} is corrupt or not a Hugging Face tokenizer.json ({e})"
            ) from None
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self._eos_token = eos_token or _configured_eos(self.path.parent) or self._special_eos()
        eos = self._tk.token_to_id(self._eos_token) if self._eos_token else None
        if eos is None:
            raise DataError(
                f"tokenizer {self.path} has no end-of-document token "
                f"({self._eos_token or 'none of ' + ', '.join(EOS_NAMES)}); name one with "
                "--eos-token TOKEN (a token of its vocabulary), needed to separate documents"
            )
        self.eos_id = eos
        bos = _configured_token(self.path.parent, "bos_token")
        self.bos_id = self._tk.token_to_id(bos) if bos else None

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    def _special_eos(self) -> str | None:
        special = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
        return next((name for name in EOS_NAMES if name in special), None)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, *, add_eos=False, num_threads=0):
        del num_threads  # the Rust side parallelises batches itself (TOKENIZERS_PARALLELISM)
        out = [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]
        if add_eos:
            for ids in out:
                ids.append(self.eos_id)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)


def _configured_token(folder: pathlib.Path, key: str) -> str | None:
    """`key` ("eos_token", "bos_token") of a tokenizer_config.json in `folder`, if any."""
    try:
        value = json.loads((folder / "tokenizer_config.json").read_text()).get(key)
    except (OSError, ValueError):
        return None
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _configured_eos(folder: pathlib.Path) -> str | None:
    return _configured_token(folder, "eos_token")


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


def load_tokenizer(spec: str | os.PathLike, *, eos_token: str | None = None) -> Tokenizer:
    """A tokeniser from a `.model` (SentencePiece) or `.json` (Hugging Face) file, a folder holding
    tokenizer.json or tokenizer.model, or a Hugging Face hub name (its tokenizer.json is fetched;
    needs the network). DataError naming the file and the fix if missing or corrupt."""
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        for name in (HFTokenizer.filename, SentencePieceTokenizer.filename):
            if (p / name).is_file():
                return load_tokenizer(p / name, eos_token=eos_token)
        raise DataError(f"tokenizer folder {p} holds neither tokenizer.json nor tokenizer.model")
    if p.suffix == ".json":
        return HFTokenizer(p, eos_token)
    if p.suffix == ".model" or p.exists() or str(spec).startswith((".", "/", "~")):
        return SentencePieceTokenizer(p)
    return _from_hub(str(spec), eos_token)


def _from_hub(name: str, eos_token: str | None) -> Tokenizer:
    """Fetch `name`'s tokenizer.json (and tokenizer_config.json) into the nagjax cache."""
    out = cache_dir() / "tokenizers" / "hub" / name.replace("/", "--")
    if not (out / HFTokenizer.filename).is_file():
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DataError(
                f"tokenizer {name!r} is neither a local file nor folder; fetching it from the "
                "Hugging Face hub needs `pip install 'nagjax[hf]'`"
            ) from None
        out.mkdir(parents=True, exist_ok=True)
        try:
            path = hf_hub_download(name, HFTokenizer.filename)
        except Exception as e:  # offline, unknown repo, gated model: all end here
            raise DataError(
                f"tokenizer {name!r} is not a local file, and fetching {name}/tokenizer.json from "
                f"the Hugging Face hub failed ({type(e).__name__}: {e}); pass a local "
                "tokenizer.json or .model"
            ) from None
        try:
            shutil.copyfile(hf_hub_download(name, "tokenizer_config.json"),
                            out / "tokenizer_config.json")
        except Exception:  # optional: the eos may be found among the special tokens
            pass
        shutil.copyfile(path, out / HFTokenizer.filename)
    return HFTokenizer(out / HFTokenizer.filename, eos_token)


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
            (d for f in sources.expand_inputs([str(item)]) for d in sources.read_documents(f))
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
    return SentencePieceTokenizer(model_path)


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
                return SentencePieceTokenizer(path)
            except DataError:
                path.unlink()  # a cache entry: rebuild it rather than fail
        return train_tokenizer(embedded_documents("train"), path, vocab_size, files=False)
