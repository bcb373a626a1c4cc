"""Data mixtures (`data.sources`): deterministic weighted interleaving, exact resume from a
checkpoint, per-source validation losses, one shared tokeniser; `nagjax sample` decodes with a
Hugging Face tokenizer.json."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from conftest import TINY_RUN, make_hf_tokenizer
from nagjax.cli import main
from nagjax.config import ConfigError, Config, DataConfig, apply_overrides
from nagjax.interrupts import Interrupted
from nagjax.data import DataError, build_shards, embedded_documents, train_iterator
from nagjax.data.mixture import open_sources, sources_of
from nagjax.runtime import enable_compilation_cache
from nagjax.train.logging import ScalarWriter, read_metrics
from nagjax.train.trainer import train


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two shard folders ("prose" and "verse") sharing one Hugging Face tokenizer.json."""
    root = tmp_path_factory.mktemp("mix")
    docs = embedded_documents("validation")
    tk = make_hf_tokenizer(docs[:20], root / "tokenizer.json", vocab_size=512)
    out = {}
    for name, chunk in (("prose", docs[:12]), ("verse", docs[-12:])):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in chunk))
        build_shards([str(path)], root / name, tokenizer=str(tk), val_fraction=0.2)
        out[name] = root / name
    return out


def _rows(batches):
    return [bytes(np.asarray(r, np.int32)) for b in batches for r in b["inputs"]]


def test_mixture_is_weighted_deterministic_and_resumes(two_sources):
    spec = f"{two_sources['prose']}:0.75,{two_sources['verse']}:0.25"
    cfg = DataConfig(sources=spec, seq_len=32, batch_size=8, shuffle_seed=5)
    assert [(s.name, s.weight) for s in sources_of(cfg)] == [("prose", 0.75), ("verse", 0.25)]
    it = train_iterator(cfg)
    first = [next(it) for _ in range(6)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = train_iterator(cfg)
    resumed.set_state(state)
    assert _rows([next(resumed) for _ in range(4)]) == _rows(expected)
    again = train_iterator(cfg)
    assert _rows([next(again) for _ in range(10)]) == _rows(first + expected)
    # every row is a window of the source the mixture assigns it, in a 3:1 ratio
    windows = {name: {bytes(np.asarray(split.tokens[i * 32:i * 32 + 32], np.int32))
                      for i in range((split.n_tokens - 1) // 32)}
               for (src, split), name in zip(open_sources(cfg, "train"), ("prose", "verse"))}
    counts = {name: sum(r in w for r in _rows(first + expected)) for name, w in windows.items()}
    assert counts == {"prose": 60, "verse": 20}
    # process sharding still partitions the global batches
    parts = [train_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    local = [next(p) for p in parts]
    assert _rows(local) == _rows(first[:1])


def test_mixture_config_and_tokenizer_errors(two_sources, tmp_path):
    with pytest.raises(ConfigError, match="data.sources: item .* is not \\[NAME=\\]DIR:WEIGHT"):
        apply_overrides(Config(), ["data.sources=shards/a"])
    with pytest.raises(ConfigError, match="either data.source or data.sources"):
        apply_overrides(Config(), ["data.sources=a=x:1", "data.source=/y"])
    cfg = DataConfig(sources=f"embedded:0.5,{two_sources['prose']}:0.5", vocab_size=4096)
    with pytest.raises(DataError, match=r"prose \(.*tokenizer\.json.*\) and embedded \(.*\) were "
                                        r"built with different tokenizers"):
        train_iterator(cfg)


def test_mixture_training_resumes_exactly_logs_per_source_and_samples(two_sources, tmp_path, capsys,
                                                                      monkeypatch):
    enable_compilation_cache()  # as the CLI does: the runs compile the same programs once
    spec = f"data.sources=p={two_sources['prose']}:0.5,v={two_sources['verse']}:0.5"
    overrides = [*TINY_RUN, spec, "data.seq_len=16", "train.eval_batches=1", "train.log_every=1",
                 "train.eval_every=2", "train.checkpoint_every=2", "optim.warmup_steps=1"]
    full = apply_overrides(Config(), [*overrides, "train.steps=4"])
    train(full, tmp_path / "full")
    write = ScalarWriter.write

    def stop_after_step_2(self, step, scalars):  # SIGTERM: the trainer saves step 2 and stops
        write(self, step, scalars)
        if step == 2 and "train/loss" in scalars:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ScalarWriter, "write", stop_after_step_2)
    with pytest.raises(Interrupted, match="saved checkpoint at step 2"):
        train(full, tmp_path / "cut")
    monkeypatch.setattr(ScalarWriter, "write", write)
    train(full, tmp_path / "cut")  # resumes at step 2: the mixture position comes from the checkpoint
    ref = read_metrics(tmp_path / "full" / "logs" / "metrics.jsonl")
    got = read_metrics(tmp_path / "cut" / "logs" / "metrics.jsonl")
    assert [got[s]["train/loss"] for s in range(1, 5)] == [ref[s]["train/loss"] for s in range(1, 5)]
    last = ref[4]
    for key in ("eval/loss/p", "eval/loss/v", "eval/bpb/p", "eval/bpb/v"):
        assert key in last and np.isfinite(last[key])
    assert last["eval/loss"] == pytest.approx(0.5 * last["eval/loss/p"] + 0.5 * last["eval/loss/v"])
    assert last["eval/loss/p"] != last["eval/loss/v"]
    capsys.readouterr()
    assert main(["sample", "--workdir", str(tmp_path / "full"), "--prompt", "The", "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("The") and "<|endoftext|>" not in printed[:3]
    # The run keeps its own tokenizer: it samples and exports the same where its shards are not.
    kept = tmp_path / "full" / "tokenizer"
    assert (kept / "tokenizer.json").read_bytes() == (two_sources["prose"] / "tokenizer.json").read_bytes()
    away = {p: p.with_name(p.name + ".away") for p in two_sources.values()}
    for here, there in away.items():
        here.rename(there)
    try:
        assert main(["sample", "--workdir", str(tmp_path / "full"), "--prompt", "The", "--max-tokens", "4",
                     "--temperature", "0"]) == 0
        assert capsys.readouterr().out == printed
        assert main(["export", "--workdir", str(tmp_path / "full"), "--out", str(tmp_path / "hf")]) == 0
        assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (kept / "tokenizer.json").read_bytes()
    finally:
        for here, there in away.items():
            there.rename(here)
