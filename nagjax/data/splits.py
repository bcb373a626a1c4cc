"""Opening a config's tokens: a shard folder as it is, or the embedded corpus as shards that are
built (build.py) and cached on first use. Above both the shard format (shards.py) and the builder."""

from __future__ import annotations

import pathlib
import shutil
import sys

from nagjax.data import tokenizer as tok
from nagjax.data.build import write_splits
from nagjax.data.corpus import DataError, cache_dir, corpus_id, embedded_documents, file_lock
from nagjax.data.shards import SPLITS, TokenSplit, base_meta, finish_dir, open_shards, tmp_dir


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
        tmp = tmp_dir(out)
        try:
            model = tk.copy_to(tmp)
            labelled = ((s, d) for s in SPLITS for d in embedded_documents(s))
            meta = base_meta(model)
            meta.update(inputs=["embedded"], splits=write_splits(tmp, labelled, model))
            finish_dir(tmp, out, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def open_split(data_cfg, split: str) -> TokenSplit:
    """The tokens of `split` for a DataConfig with one source: the embedded corpus or a shard
    folder (a mixture's sources are opened one by one, mixture.py)."""
    return open_source(data_cfg.source, data_cfg, split)


def open_source(source: str, data_cfg, split: str) -> TokenSplit:
    if source == "embedded":
        return open_shards(embedded_shards_dir(data_cfg), split)
    return open_shards(source, split, data_cfg.tokenizer)
