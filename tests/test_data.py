"""Data layer: embedded corpus, tokeniser, token shards, Grain pipeline (CPU, fast)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil

import numpy as np
import pytest

from nagjax.data.build import is_validation

from nagjax.config import DataConfig
from nagjax.data import (
    DataError,
    build_shards,
    bytes_per_token,
    corpus,
    embedded_documents,
    embedded_text,
    embedded_tokenizer,
    eval_batches,
    load_tokenizer,
    open_split,
    pipeline,
    Inputs,
    run_data_command,
    train_iterator,
    train_tokenizer,
)

CFG = DataConfig(vocab_size=4096, seq_len=64, batch_size=8, shuffle_seed=3)


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """A .txt.gz (documents separated by two blank lines) and a .jsonl.xz, with their documents."""
    d = tmp_path_factory.mktemp("inputs")
    paras = [p for p in embedded_text("validation").split("\n\n") if len(p) > 200][:60]
    txt_docs = ["\n\n".join(paras[i : i + 3]) for i in range(0, 30, 3)]
    json_docs = [p + " \u00e9\u00e8 \U0001f642" for p in paras[30:60]]
    with gzip.open(d / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n\n".join(txt_docs) + "\n")
    with lzma.open(d / "b.jsonl.xz", "wt", encoding="utf-8") as f:
        for doc in json_docs:
            f.write(json.dumps({"id": 1, "body": doc}) + "\n\n")  # blank lines are skipped
    return [str(d / "a.txt.gz"), str(d / "b.jsonl.xz")], txt_docs + json_docs


@pytest.fixture(scope="session")
def shard_dir(tiny_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "tiny"
    build_shards(
        tiny_inputs[0], out, tokenizer=None, vocab_size=512, val_fraction=0.1, text_field="body"
    )
    return out


def _windows(batches):
    return [bytes(row) for b in batches for row in np.asarray(b["inputs"])]


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def test_corpus_sizes_and_disjoint_splits():
    train, val = embedded_documents("train"), embedded_documents("validation")
    n_train = len(embedded_text("train").encode())
    n_val = len(embedded_text("validation").encode())
    assert n_train + n_val >= 5_000_000
    assert 0.01 < n_val / (n_train + n_val) < 0.06
    assert len(train) > 1000 and len(val) > 20
    assert not set(train) & set(val)
    assert all(d and "\n\n\n" not in d for d in train + val)
    assert any(d.startswith("Genesis 1\n\nIn the beginning God") for d in train)
    assert "It is a truth universally acknowledged" in embedded_text("train")
    sizes = sum(
        os.path.getsize(corpus.CORPUS_DIR / f) for f in ("train.txt.xz", "validation.txt.xz")
    )
    assert sizes < 4_000_000
    with pytest.raises(ValueError, match="split"):
        embedded_text("test")


def test_corpus_missing_or_corrupt_file_names_it(tmp_path, monkeypatch):
    for f in ("manifest.json", "train.txt.xz", "validation.txt.xz"):
        shutil.copy(corpus.CORPUS_DIR / f, tmp_path / f)
    monkeypatch.setattr(corpus, "CORPUS_DIR", tmp_path)
    data = (tmp_path / "train.txt.xz").read_bytes()
    (tmp_path / "train.txt.xz").write_bytes(data[:1000] + b"\0" * 64 + data[1064:])
    with pytest.raises(DataError, match="train.txt.xz.*corrupt"):
        embedded_text("train")
    (tmp_path / "validation.txt.xz").unlink()
    with pytest.raises(DataError, match="validation.txt.xz"):
        embedded_text("validation")


# ---------------------------------------------------------------------------------------------
# Tokeniser
# ---------------------------------------------------------------------------------------------


def test_embedded_tokenizer_round_trip_and_cache(cache):
    tk = embedded_tokenizer(4096)
    assert tk.vocab_size == 4096 and (tk.bos_id, tk.eos_id) == (1, 2)
    assert tk.path.parent == cache / "tokenizers"
    for text in [
        "CHAPTER 1\n\nThe family of Dashwood",
        "  tabs\tand  spaces \n\n\n",
        "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001f642 \x00 \u200b",
        embedded_documents("validation")[0],
    ]:
        ids = tk.encode(text)
        assert all(isinstance(i, int) for i in ids) and tk.eos_id not in ids
        assert tk.decode(ids) == text
    prose = embedded_documents("validation")[1]
    assert len(prose.encode()) / len(tk.encode(prose)) > 3  # a real BPE, not bytes
    mtime = tk.path.stat().st_mtime_ns
    assert embedded_tokenizer(4096).path.stat().st_mtime_ns == mtime  # cached, not retrained
    assert not [p for p in tk.path.parent.iterdir() if ".tmp" in p.name]


def test_train_tokenizer_is_atomic_and_deterministic(tmp_path):
    texts = embedded_documents("validation")[:10]
    a = train_tokenizer(texts, tmp_path / "a.model", 400)
    b = train_tokenizer(iter(texts), tmp_path / "b.model", 400)
    assert a.vocab_size == 400 and a.path.read_bytes() == b.path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]
    s = "\u00bfQu\u00e9? \u0416 \U0001f600\n"
    assert a.decode(a.encode(s)) == s  # byte fallback covers unseen characters
    f = tmp_path / "in.txt"
    f.write_text("\n\n\n".join(texts))
    c = train_tokenizer([f], tmp_path / "c.model", 400)  # from files
    assert c.vocab_size == 400


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.model does not exist.*nagjax data"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match=r"bad\.model is corrupt.*nagjax data"):
        load_tokenizer(bad)


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def test_build_shards_from_txt_and_jsonl(shard_dir, tiny_inputs):
    inputs, docs = tiny_inputs
    meta = json.loads((shard_dir / "meta.json").read_text())
    assert meta["format"] == "nagjax-token-shards" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 512 and meta["inputs"] == inputs
    tk = load_tokenizer(shard_dir / "tokenizer.model")
    val_idx = {i for i in range(len(docs)) if is_validation(i, 0.1)}
    assert val_idx == {0, 10, 20, 30}
    expected = {
        "train": [d for i, d in enumerate(docs) if i not in val_idx],
        "validation": [d for i, d in enumerate(docs) if i in val_idx],
    }
    for split, split_docs in expected.items():
        s = meta["splits"][split]
        assert s["documents"] == len(split_docs)
        assert s["bytes"] == sum(len(d.encode()) for d in split_docs)
        toks = np.fromfile(shard_dir / s["files"][0]["name"], dtype="<u2")
        assert len(toks) == s["tokens"]
        assert int(toks[-1]) == tk.eos_id and (toks == tk.eos_id).sum() == len(split_docs)
        cuts = np.flatnonzero(toks == tk.eos_id)
        decoded = [tk.decode(p) for p in np.split(toks, cuts + 1)[:-1]]
        assert [d.removesuffix(tk.decode([tk.eos_id])) for d in decoded] == split_docs
        ts = open_split(DataConfig(source=str(shard_dir)), split)
        assert ts.n_tokens == s["tokens"] and ts.bytes_per_token == s["bytes"] / s["tokens"]
    assert not [p for p in shard_dir.parent.iterdir() if p.name.startswith(".")]


def test_build_shards_with_given_tokenizer_and_cli_summary(tiny_inputs, tmp_path, capsys):
    tk = embedded_tokenizer(4096)
    out = tmp_path / "given"
    meta = run_data_command(
        Inputs(files=(tiny_inputs[0][0],)), str(out), tokenizer=str(tk.path), vocab_size=999,
        val_fraction=0.2,
    )
    assert meta["vocab_size"] == 4096 and meta["splits"]["validation"]["documents"] == 2
    assert (out / "tokenizer.model").read_bytes() == tk.path.read_bytes()
    printed = capsys.readouterr().out
    assert "train" in printed and "bytes/token" in printed and f"data.source={out}" in printed
    # rebuilding over an existing directory replaces it whole
    build_shards([tiny_inputs[0][0]], out, tokenizer=str(tk.path), val_fraction=0.5)
    assert json.loads((out / "meta.json").read_text())["splits"]["validation"]["documents"] == 5


def test_build_shards_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        build_shards([str(bad)], tmp_path / "out", vocab_size=300, val_fraction=0.1)
    one = tmp_path / "one.txt"
    one.write_text("a single document without blank-line separators")
    with pytest.raises(DataError, match="need >= 2"):
        build_shards([str(one)], tmp_path / "out", vocab_size=300, val_fraction=0.1)
    with pytest.raises(DataError, match="does not exist"):
        build_shards(
            [str(tmp_path / "missing.txt")], tmp_path / "out", vocab_size=300, val_fraction=0.1
        )
    assert not (tmp_path / "out").exists()


def test_shard_validation_errors_name_the_file(shard_dir, tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist.*nagjax data --input"):
        open_split(DataConfig(source=str(tmp_path / "nowhere")), "train")
    d = tmp_path / "copy"
    shutil.copytree(shard_dir, d)
    cfg = DataConfig(source=str(d))
    with open(d / "train-00000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(
        DataError, match=r"train-00000\.bin has 100 bytes.*nagjax data --input .*a\.txt\.gz"
    ):
        open_split(cfg, "train")
    shutil.copy(embedded_tokenizer(4096).path, d / "tokenizer.model")
    with pytest.raises(
        DataError, match=r"tokenizer\.model \(vocab_size 4096\) is not the tokenizer"
    ):
        open_split(cfg, "validation")
    shutil.copy(shard_dir / "tokenizer.model", d / "tokenizer.model")
    assert open_split(cfg, "validation").n_tokens > 0
    with pytest.raises(DataError, match="data.tokenizer=.* is not the tokenizer"):
        open_split(
            DataConfig(source=str(d), tokenizer=str(embedded_tokenizer(4096).path)), "validation"
        )
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json is missing"):
        open_split(cfg, "validation")


def test_embedded_cache_rebuilds_when_corrupt(cache, tmp_path, monkeypatch):
    split = open_split(CFG, "train")
    assert split.directory.parent == cache / "shards"
    shutil.copytree(cache, tmp_path / "c")
    monkeypatch.setenv("NAGJAX_CACHE_DIR", str(tmp_path / "c"))
    with open(tmp_path / "c" / "shards" / split.directory.name / "train-00000.bin", "r+b") as f:
        f.truncate(10)
    again = open_split(CFG, "train")
    assert again.directory.parent == tmp_path / "c" / "shards"
    assert np.array_equal(again.tokens, split.tokens)


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def test_batches_shape_shift_and_bytes_per_token():
    it = train_iterator(CFG)
    b = next(it)
    assert b["inputs"].shape == b["targets"].shape == (8, 64)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert 0 <= b["inputs"].min() and b["inputs"].max() < 4096
    bpt = bytes_per_token(CFG, "validation")
    split = open_split(CFG, "validation")
    assert 3 < bpt < 6 and bpt == split.n_bytes / split.n_tokens


def test_iterator_resume_is_exact():
    it = train_iterator(CFG)
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    assert len(json.dumps(state)) < 1000
    expected = [next(it) for _ in range(3)]
    resumed = train_iterator(CFG)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    for e, g in zip(expected, got):
        assert np.array_equal(e["inputs"], g["inputs"]) and np.array_equal(
            e["targets"], g["targets"]
        )
    again = train_iterator(CFG)  # deterministic given the seed
    assert _windows([next(again) for _ in range(8)]) == _windows(first + expected)
    other = train_iterator(DataConfig(**{**CFG.__dict__, "shuffle_seed": 4}))
    assert _windows([next(other) for _ in range(5)]) != _windows(first)


def test_epochs_cover_every_window_once_and_reshuffle():
    n = len(pipeline.WindowSource(open_split(DataConfig(seq_len=1024), "train"), 1024))
    b = next(b for b in (3, 5, 7, 11) if n % b)  # so that a batch straddles the epoch boundary
    cfg = DataConfig(seq_len=1024, batch_size=b, shuffle_seed=0)
    it = train_iterator(cfg)
    rows = _windows([next(it) for _ in range(-(-2 * n // b))])
    epoch0, epoch1 = rows[:n], rows[n : 2 * n]
    src = pipeline.WindowSource(open_split(cfg, "train"), cfg.seq_len)
    all_windows = sorted(bytes(np.asarray(src[i][:-1], np.int32)) for i in range(n))
    assert sorted(epoch0) == all_windows and sorted(epoch1) == all_windows
    assert epoch0 != epoch1
    # corpus_passes counts those epochs: 2n windows are two passes (the runs' 4-pass warning)
    assert pipeline.corpus_passes(cfg, steps=2 * n) == pytest.approx(2.0 * b)


def test_process_sharding_partitions_global_batches():
    glob = train_iterator(CFG)
    parts = [train_iterator(CFG, process_index=p, process_count=2) for p in range(2)]
    for _ in range(4):
        g = next(glob)
        local = [next(p) for p in parts]
        assert local[0]["inputs"].shape == (4, 64)
        assert not set(_windows([local[0]])) & set(_windows([local[1]]))
        for key in ("inputs", "targets"):
            assert np.array_equal(np.concatenate([b[key] for b in local]), g[key])
    ev = eval_batches(CFG, 2)
    ev_parts = [eval_batches(CFG, 2, process_index=p, process_count=2) for p in range(2)]
    for k in range(2):
        assert np.array_equal(
            np.concatenate([ev_parts[0][k]["inputs"], ev_parts[1][k]["inputs"]]), ev[k]["inputs"]
        )
    with pytest.raises(DataError, match="divisible"):
        train_iterator(CFG, process_index=0, process_count=3)


def test_eval_batches_in_order_and_wrap_around():
    split = open_split(CFG, "validation")
    n_windows = (split.n_tokens - 1) // CFG.seq_len
    ev = eval_batches(CFG, 2)
    assert np.array_equal(ev[0]["inputs"][0], split.tokens[: CFG.seq_len])
    assert np.array_equal(ev[1]["targets"][0], split.tokens[8 * 64 + 1 : 9 * 64 + 1])
    n_batches = -(-n_windows // 8) + 1
    many = eval_batches(CFG, n_batches)
    rows = _windows(many)
    assert rows[n_windows] == rows[0]  # wrapped around to the start
    assert _windows(eval_batches(CFG, 2)) == _windows(ev)  # deterministic


def test_tiny_shard_dir_trains_and_evaluates(shard_dir):
    cfg = DataConfig(source=str(shard_dir), seq_len=2048, batch_size=2)
    val = open_split(cfg, "validation")
    assert val.n_tokens < cfg.seq_len + 1  # shorter than one window: tiled
    ev = eval_batches(cfg, 1)[0]
    assert np.array_equal(ev["inputs"][0][: val.n_tokens], val.tokens)
    b = next(train_iterator(cfg))
    assert b["inputs"].shape == (2, 2048) and b["inputs"].max() < 512


def test_batches_are_fast():
    import time

    it = train_iterator(DataConfig(seq_len=256, batch_size=16))
    next(it)
    t0 = time.perf_counter()
    for _ in range(200):
        next(it)
    assert (time.perf_counter() - t0) / 200 < 2e-3


def test_worker_processes_give_the_same_batches_and_resume():
    cfg = DataConfig(**{**CFG.__dict__, "worker_count": 1})
    it = train_iterator(cfg)
    try:
        first = [next(it) for _ in range(5)]
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(3)]
    finally:
        it.close()
    resumed = train_iterator(cfg)
    try:
        resumed.set_state(state)
        assert _windows([next(resumed) for _ in range(3)]) == _windows(expected)
    finally:
        resumed.close()
    plain = train_iterator(CFG)  # same stream as in the main process
    assert _windows([next(plain) for _ in range(8)]) == _windows(first + expected)


def test_a_folder_input_skips_metadata_json_and_dataset_flags_need_a_dataset(tmp_path, capsys):
    from nagjax.cli import main

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n\n".join(f"document {i} " + "word " * 50 for i in range(200)))
    (folder / "dataset_info.json").write_text('{"description": "not a document"}')
    assert main(["data", "--input", str(folder), "--output", str(tmp_path / "out"), "--vocab-size", "300",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["inputs"] == [str(folder / "a.txt")]
    assert main(["data", "--input", str(folder), "--output", str(tmp_path / "x"), "--data-files", "*.parquet"]) == 2
    assert "add --dataset" in capsys.readouterr().err
