"""Weighted mixtures of shard folders (`data.sources=[NAME=]DIR:WEIGHT,...`).

Training: each source is its own shuffled, endlessly repeated stream of windows (seeded by
`data.shuffle_seed` + its position in the list), and Grain's `MapDataset.mix` interleaves them
deterministically in proportion to the weights (element k of the mixture is a fixed function of k).
The mixture is then batched like a single source, so the data iterator's state (a position)
is the whole mixture state: it is saved in every checkpoint and a resumed run continues exactly.

Evaluation: each source's validation split is evaluated on its own (`eval/loss/NAME`,
`eval/bpb/NAME`); `eval/loss` and `eval/bpb` are their weighted means (the weights normalised),
i.e. the expected loss under the training mixture.

All sources must share one tokeniser (the same file, by sha256); a mismatch is an error naming
both folders. A config without `data.sources` is a one-source "mixture" named "" (no suffix).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

from nagjax.config import parse_sources
from nagjax.data.corpus import DataError
from nagjax.data.shards import TokenSplit
from nagjax.data.splits import open_source
from nagjax.data.tokenizer import Tokenizer, load_tokenizer

RUN_TOKENIZER = "tokenizer"  # WORKDIR/tokenizer/: the run's own copy of its tokeniser


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # "" for the single source of a config without data.sources
    path: str  # a shard folder or "embedded"
    weight: float  # normalised: the weights of a mixture sum to 1


def sources_of(data_cfg) -> list[Source]:
    if not data_cfg.sources:
        return [Source("", data_cfg.source, 1.0)]
    items = parse_sources(data_cfg.sources)
    total = sum(w for _, _, w in items)
    return [Source(name, path, w / total) for name, path, w in items]


def is_mixture(data_cfg) -> bool:
    return bool(data_cfg.sources)


def open_sources(data_cfg, split: str) -> list[tuple[Source, TokenSplit]]:
    """Every source's `split`, checked to share one tokeniser."""
    out = [(s, open_source(s.path, data_cfg, split)) for s in sources_of(data_cfg)]
    first_src, first = out[0]
    for src, ts in out[1:]:
        if ts.tokenizer.sha256() != first.tokenizer.sha256():
            raise DataError(
                f"data.sources: {src.name} ({ts.directory}, tokenizer {ts.tokenizer.path}, vocab "
                f"{ts.tokenizer.vocab_size}) and {first_src.name} ({first.directory}, tokenizer "
                f"{first.tokenizer.path}, vocab {first.tokenizer.vocab_size}) were built with "
                "different tokenizers; rebuild one with `nagjax data ... --tokenizer` naming the "
                "other's tokenizer file"
            )
    return out


def tokenizer_of(data_cfg) -> Tokenizer:
    """The (shared) tokeniser of a config's data."""
    return open_sources(data_cfg, "train")[0][1].tokenizer


def keep_with_run(tokenizer: Tokenizer, workdir: str | os.PathLike) -> None:
    """Copy the tokeniser (and a tokenizer_config.json naming its special tokens) into
    WORKDIR/tokenizer/, so that the trained run can be sampled and exported on a machine without
    its shards. Written to a temporary folder and renamed: never half there."""
    folder = pathlib.Path(workdir) / RUN_TOKENIZER
    kept = folder / tokenizer.filename
    if kept.is_file() and kept.read_bytes() == tokenizer.path.read_bytes():
        return
    tmp = folder.with_name(RUN_TOKENIZER + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(tokenizer.path, tmp / tokenizer.filename)
    beside = tokenizer.path.parent / "tokenizer_config.json"
    config = json.loads(beside.read_text()) if beside.is_file() else {}
    if tokenizer.eos_token:  # the eos the shards were built with (--eos-token wins over the file)
        config["eos_token"] = tokenizer.eos_token
    if config:
        (tmp / beside.name).write_text(json.dumps(config, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def run_tokenizer(data_cfg, workdir: str | os.PathLike) -> Tokenizer:
    """The tokeniser of a trained run: its data's, or, where the shards are not (another
    machine), the copy the trainer kept in WORKDIR/tokenizer/."""
    try:
        return tokenizer_of(data_cfg)
    except DataError as e:
        folder = pathlib.Path(workdir) / RUN_TOKENIZER
        if folder.is_dir():
            return load_tokenizer(folder)
        raise DataError(f"{e}; nor does {pathlib.Path(workdir)} hold its own copy ({RUN_TOKENIZER}/, "
                        "kept by runs trained with this version): copy the shard folder here") from None

