"""Data layer: embedded corpus, input readers, tokenisers, token shards and the Grain pipeline.

Names are imported on first use (PEP 562), so a `nagjax data` worker process that only tokenises
does not import Grain or JAX.
"""

import importlib

_HOMES = {
    "build_shards": "build", "run_data_command": "build",
    "DataError": "corpus", "cache_dir": "corpus", "embedded_documents": "corpus", "embedded_text": "corpus",
    "bytes_per_token": "pipeline", "eval_batches": "pipeline", "train_iterator": "pipeline",
    "TokenSplit": "shards", "open_split": "splits",
    "Inputs": "sources",
    "HFTokenizer": "tokenizer", "SentencePieceTokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "embedded_tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"nagjax.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'nagjax.data' has no attribute {name!r}")
