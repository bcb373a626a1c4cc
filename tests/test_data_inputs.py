"""`nagjax data` inputs: Parquet, Hugging Face datasets (local files, offline), encoding errors,
parallel workers, multi-part shard folders, and Hugging Face `tokenizers` tokenisers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_hf_tokenizer
from nagjax.cli import main
from nagjax.config import DataConfig
from nagjax.data import DataError, Inputs, build_shards, embedded_documents, load_tokenizer, open_split
from nagjax.data import sources
from nagjax.data.tokenizer import HFTokenizer, SentencePieceTokenizer


@pytest.fixture(scope="module")
def docs():
    """60 documents of real prose with accents and an emoji (not in a tiny BPE's vocabulary)."""
    paras = [p for d in embedded_documents("validation")[:6] for p in d.split("\n\n") if len(p) > 80]
    return [p + " caf\u00e9 \U0001f642" for p in paras[:60]]


@pytest.fixture(scope="module")
def jsonl(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def sp_model(jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "s"
    build_shards([str(jsonl)], out, vocab_size=400, val_fraction=0.1)
    return str(out / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tokenizer_json(docs, tmp_path_factory):
    """A tiny byte-level BPE trained here (offline) and saved as tokenizer.json."""
    return make_hf_tokenizer(docs, tmp_path_factory.mktemp("hf") / "tokenizer.json")


def _split_docs(shard_dir, split):
    """The documents of a split, decoded (eos cuts), as a sorted list."""
    ts = open_split(DataConfig(source=str(shard_dir)), split)
    toks, eos = ts.tokens, ts.tokenizer.eos_id
    cuts = np.flatnonzero(toks == eos)
    return sorted(ts.tokenizer.decode(p[:-1]) for p in np.split(toks, cuts + 1)[:-1]), ts


def test_parquet_and_hf_dataset_equal_jsonl(docs, jsonl, sp_model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    folder = tmp_path / "pq"
    folder.mkdir()
    table = pa.table({"body": docs, "n": list(range(len(docs)))})
    pq.write_table(table.slice(0, 25), folder / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(25), folder / "b.parquet", row_group_size=7)
    assert list(sources.documents(Inputs(files=(str(folder),), text_field="body"))) == docs
    kw = dict(tokenizer=sp_model, val_fraction=0.1)
    ref = build_shards(Inputs(files=(str(jsonl),)), tmp_path / "ref", **kw)
    outs = {
        "parquet": build_shards(Inputs(files=(str(folder),), text_field="body"), tmp_path / "p", **kw),
        # a local folder through datasets.load_dataset(path), and a builder with data_files
        "hf_folder": build_shards(Inputs(dataset=str(folder), text_field="body"), tmp_path / "h1", **kw),
        "hf_json": build_shards(Inputs(dataset="json", data_files=(str(jsonl),)), tmp_path / "h2", **kw),
    }
    for name, meta in outs.items():
        assert meta["splits"] == ref["splits"], name
        for split in ("train", "validation"):
            a = np.fromfile(tmp_path / "ref" / f"{split}-00000.bin", "<u2")
            b = np.fromfile(meta_dir(tmp_path, name) / f"{split}-00000.bin", "<u2")
            assert np.array_equal(a, b), name
    assert outs["hf_json"]["inputs"] == ["hf:json[train]"]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, n\).*--text-field"):
        build_shards(Inputs(files=(str(folder),)), tmp_path / "x", **kw)
    with pytest.raises(DataError, match="no column 'nope'.*--text-field"):
        build_shards(Inputs(dataset=str(folder), text_field="nope"), tmp_path / "x", **kw)


def meta_dir(tmp_path, name):
    return tmp_path / {"parquet": "p", "hf_folder": "h1", "hf_json": "h2"}[name]


def test_encoding_errors_flag(tmp_path, capsys):
    bad = tmp_path / "dict.txt"
    good = ["first entry " * 20, "second entry " * 20, "third entry " * 20]
    bad.write_bytes(("\n\n\n".join(good[:2]) + "\n\n\n").encode() + b"caf\xe9 \xff entry\n\n\n"
                    + good[2].encode())
    with pytest.raises(DataError, match=r"dict\.txt:7: not valid UTF-8.*--encoding-errors replace"):
        list(sources.read_documents(bad))
    assert main(["data", "--input", str(bad), "--output", str(tmp_path / "o"), "--vocab-size", "300",
                 "--workers", "0"]) == 2
    assert "--encoding-errors replace" in capsys.readouterr().err
    replaced = list(sources.read_documents(bad, encoding_errors="replace"))
    assert replaced == [*good[:2], "caf\ufffd \ufffd entry", good[2]]
    assert list(sources.read_documents(bad, encoding_errors="ignore"))[2] == "caf  entry"
    assert main(["data", "--input", str(bad), "--output", str(tmp_path / "o"), "--vocab-size", "300",
                 "--val-fraction", "0.3", "--encoding-errors", "ignore", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "MB/s" in out and "tokens/s" in out and f"data.source={tmp_path / 'o'}" in out


def test_text_documents_stream_like_the_old_splitter(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"\n\nA line\r\nnext\n\none blank\n\n\n\nB \t\n  \n\t\nC\r\n\n \nstill C\n\n\n")
    assert list(sources.read_documents(p)) == ["A line\nnext\n\none blank", "B \t", "C", "still C"]


def test_workers_give_the_same_shards(jsonl, sp_model, tmp_path, monkeypatch):
    from nagjax.data import build

    monkeypatch.setattr(build, "CHUNK_CHARS", 2000)  # many chunks, several in flight
    a = build_shards([str(jsonl)], tmp_path / "a", tokenizer=sp_model, val_fraction=0.1, workers=0)
    b = build_shards([str(jsonl)], tmp_path / "b", tokenizer=sp_model, val_fraction=0.1, workers=2)
    assert a["splits"] == b["splits"] and b["build"]["workers"] == 2
    for split in ("train", "validation"):
        name = f"{split}-00000.bin"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_two_parts_equal_one_whole(jsonl, sp_model, tmp_path):
    whole = build_shards([str(jsonl)], tmp_path / "whole", tokenizer=sp_model, val_fraction=0.1)
    out = tmp_path / "parts"
    build_shards([str(jsonl)], out, tokenizer=sp_model, val_fraction=0.1, shard_index=1, num_shards=2)
    with pytest.raises(DataError, match=r"2-part shard folder with part\(s\) \[0\] missing.*--shard-index I"):
        open_split(DataConfig(source=str(out)), "train")
    build_shards([str(jsonl)], out, tokenizer=sp_model, val_fraction=0.1, shard_index=0, num_shards=2)
    for split in ("train", "validation"):
        want, ts_whole = _split_docs(tmp_path / "whole", split)
        got, ts_parts = _split_docs(out, split)
        assert got == want and len(got) == whole["splits"][split]["documents"]
        assert (ts_parts.n_tokens, ts_parts.n_bytes, ts_parts.n_documents) == (
            ts_whole.n_tokens, ts_whole.n_bytes, ts_whole.n_documents)
    with pytest.raises(DataError, match="--num-shards > 1 needs --tokenizer"):
        build_shards([str(jsonl)], out, val_fraction=0.1, shard_index=0, num_shards=2)


def test_hf_tokenizer_json_shards_and_round_trip(docs, jsonl, hf_tokenizer_json, tmp_path):
    tk = load_tokenizer(hf_tokenizer_json)
    assert isinstance(tk, HFTokenizer) and tk.eos_id == 0 and tk.vocab_size == 600
    text = "na\u00efve caf\u00e9 \U0001f642\n\n  spaces"
    assert tk.decode(tk.encode(text)) == text and tk.eos_id not in tk.encode(text)
    assert load_tokenizer(hf_tokenizer_json.parent).path == tk.path  # a folder holding it
    meta = build_shards([str(jsonl)], tmp_path / "s", tokenizer=str(hf_tokenizer_json), val_fraction=0.1)
    assert meta["tokenizer"] == "tokenizer.json" and meta["tokenizer_kind"] == "huggingface"
    assert (tmp_path / "s" / "tokenizer.json").read_bytes() == hf_tokenizer_json.read_bytes()
    got, ts = _split_docs(tmp_path / "s", "validation")
    assert isinstance(ts.tokenizer, HFTokenizer)
    assert got == sorted(d for i, d in enumerate(docs) if i % 10 == 0)
    with pytest.raises(DataError, match="--eos-token"):
        load_tokenizer(hf_tokenizer_json, eos_token="<nope>")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    (tmp_path / "cfg" / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|endoftext|>"}}')
    assert load_tokenizer(tmp_path / "cfg").eos_id == 0
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is corrupt or not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    assert isinstance(load_tokenizer(ts.directory / "tokenizer.json"), HFTokenizer)


def test_hub_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set it directly
    monkeypatch.setenv("NAGJAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"nobody/no-such-tokenizer.*pass a local tokenizer\.json"):
        load_tokenizer("nobody/no-such-tokenizer")
    assert isinstance(SentencePieceTokenizer, type)
