"""Data layer: embedded corpus, input readers, tokenisers, token shards and the Grain pipeline."""

from nagjax.data.build import build_shards, run_data_command
from nagjax.data.corpus import DataError, cache_dir, embedded_documents, embedded_text
from nagjax.data.pipeline import bytes_per_token, eval_batches, train_iterator
from nagjax.data.shards import TokenSplit, open_split
from nagjax.data.sources import Inputs
from nagjax.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                   embedded_tokenizer, load_tokenizer, train_tokenizer)

__all__ = [
    "DataError",
    "HFTokenizer",
    "Inputs",
    "SentencePieceTokenizer",
    "TokenSplit",
    "Tokenizer",
    "build_shards",
    "bytes_per_token",
    "cache_dir",
    "embedded_documents",
    "embedded_text",
    "embedded_tokenizer",
    "eval_batches",
    "load_tokenizer",
    "open_split",
    "run_data_command",
    "train_iterator",
    "train_tokenizer",
]
