#!/usr/bin/env python3
"""Rebuild nagjax's embedded corpus (nagjax/data/corpus/*.txt.xz) from Debian packages.

Exact steps (Debian 12 "bookworm"; the output is byte-for-byte reproducible from the same packages):

    apt-get update
    apt-get install -y --no-install-recommends r-cran-janeaustenr bible-kjv   # 1.0.0-1, 4.38
    python3 scripts/build_embedded_corpus.py            # writes nagjax/data/corpus/

Sources: Jane Austen's six novels from the R package janeaustenr (`austen_books()`), and the King
James Bible from the `bible` program of bible-kjv (`bible "gen1:1-rev22:21"`). Both texts are in
the public domain. Cleaning: Austen paragraphs (re-flowed hard-wrapped lines) with `_emphasis_`
marks and runs of spaces removed; KJV verse numbers stripped, one verse per line.

Format of each file: documents separated by two blank lines ("\\n\\n\\n"), paragraphs inside a
document by one blank line. A document is one chapter (Austen) or one chapter of a book (KJV).
The validation split holds out the final chapters (>= 2% of the bytes) of each work, where the
works are the six novels and the two Testaments; its documents are interleaved across works so
that any prefix of it samples every work.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import pathlib
import re
import shutil
import subprocess
import sys

OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "nagjax" / "data" / "corpus"
VAL_FRACTION = 0.02
DOC_SEP = "\n\n\n"
APT_HINT = "apt-get install -y --no-install-recommends r-cran-janeaustenr bible-kjv"
R_CODE = 'library(janeaustenr); b <- austen_books(); writeLines(paste(b$book, b$text, sep="\\t"))'
HEADING_RE = re.compile(r"^(CHAPTER|Chapter|VOLUME) [0-9IVXLC]+\.?$")
NEW_TESTAMENT_FIRST_BOOK = "Matthew"


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        sys.exit(f"{cmd[0]} not found; install the sources first:\n  {APT_HINT}")
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _paragraphs(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs (blank-line separated), normalising whitespace."""
    paras, cur = [], []
    for line in lines + [""]:
        line = line.replace("_", "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(re.sub(r"\s+", " ", " ".join(cur)))
            cur = []
    return paras


def austen_works() -> list[tuple[str, list[str]]]:
    """[(novel, [chapter document, ...])] in janeaustenr's order."""
    lines_by_book: dict[str, list[str]] = {}
    for row in _run(["Rscript", "-e", R_CODE]).splitlines():
        book, _, text = row.partition("\t")
        lines_by_book.setdefault(book, []).append(text)
    works = []
    for book, lines in lines_by_book.items():
        docs, cur, has_heading, has_body = [], [], False, False
        for para in _paragraphs(lines):
            if HEADING_RE.match(para):
                if has_heading and has_body:  # front matter stays with the first chapter
                    docs.append(cur)
                    cur = []
                has_heading, has_body = True, False
            else:
                has_body = True
            cur.append(para)
        docs.append(cur)
        works.append((book, ["\n\n".join(d) for d in docs]))
    return works


def kjv_works() -> list[tuple[str, list[str]]]:
    """[("Old Testament", chapters), ("New Testament", chapters)]; verse numbers stripped."""
    blocks = re.split(r"\n\s*\n", _run(["bible", "gen1:1-rev22:21"]).strip())
    assert len(blocks) % 2 == 0, "expected alternating chapter headings and verse blocks"
    old, new, testament = [], [], None
    for heading, body in zip(blocks[0::2], blocks[1::2]):
        heading = heading.strip()
        if heading.startswith(NEW_TESTAMENT_FIRST_BOOK + " "):
            testament = new
        testament = old if testament is None else testament
        verses = re.split(r"(?m)^\s+\d+ ", "\n" + body)[1:]
        verses = [re.sub(r"\s+", " ", v).strip() for v in verses]
        testament.append(heading + "\n\n" + "\n".join(verses))
    return [("Old Testament", old), ("New Testament", new)]


def split_work(docs: list[str]) -> tuple[list[str], list[str]]:
    """Hold out the final whole chapters covering >= VAL_FRACTION of the work's bytes."""
    total = sum(len(d.encode()) for d in docs)
    k, held = 0, 0
    while held < VAL_FRACTION * total:
        k += 1
        held += len(docs[-k].encode())
    return docs[:-k], docs[-k:]


def main() -> None:
    works = austen_works() + kjv_works()
    train, val_by_work, stats = [], [], []
    for name, docs in works:
        assert all(DOC_SEP not in d and d.strip() == d for d in docs), name
        tr, va = split_work(docs)
        train += tr
        val_by_work.append(va)
        stats.append({"work": name, "documents": len(docs), "validation_documents": len(va)})
    validation = [d for group in _interleave(val_by_work) for d in group]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "documents separated by '\\n\\n\\n'", "works": stats, "splits": {}}
    for split, docs in (("train", train), ("validation", validation)):
        raw = (DOC_SEP.join(docs) + "\n").encode("utf-8")
        path = OUT_DIR / f"{split}.txt.xz"
        path.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
        manifest["splits"][split] = {
            "file": path.name,
            "documents": len(docs),
            "bytes": len(raw),
            "compressed_bytes": path.stat().st_size,
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        print(
            f"{path}: {len(docs)} documents, {len(raw):,} bytes, {path.stat().st_size:,} compressed"
        )
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _interleave(groups: list[list[str]]) -> list[list[str]]:
    """Round-robin over works so that any prefix of the validation split mixes all of them."""
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.append([g[i] for g in groups if i < len(g)])
        i += 1
    return out


if __name__ == "__main__":
    main()
