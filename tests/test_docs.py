"""The published figures name their sources, the links resolve, the README stays short.

Every markdown table with a number in README.md, docs/*.md and benchmarks/README.md must name its
source, in one form:

    Source: [docs/results/quickstart.txt](docs/results/quickstart.txt); `nagjax train ...`

on the first non-blank line after the table, or, for a page whose tables all come from one place
(a page written by `nagjax report`), anywhere on the page as

    Source (all tables on this page): `nagjax report ...`

A source lists links to committed files and/or commands in backticks. Each linked file must exist.
Where the source links text results (.txt, .json, .jsonl, .md, .csv), every figure printed in the
table's cells must appear in one of them: either as the same string, or as a number there that
rounds to the printed figure at the printed number of decimals (half-up or half-even, computed
on the decimal string: no tolerance), so a table cannot drift from its file. Numbers inside
`code spans` and link targets are labels, not figures, and are not checked. Sources that are only
commands or code (.py) are checked for existence only.
"""

from __future__ import annotations

import functools
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TABLE_PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK_PAGES = [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]

SOURCE = re.compile(r"^Source(?P<page> \(all tables on this page\))?: (?P<items>\S.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`[^`]*`")
# A figure: digits, optional thousands groups and decimals; not part of a name (nag_mod_0.25, L2).
FIGURE = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?![\d]|\.\d)")
SOURCE_NUMBER = re.compile(r"\d+(?:\.\d+)?")
TEXT_RESULTS = {".txt", ".json", ".jsonl", ".md", ".csv"}


def _lines_outside_fences(text: str):
    """(line number, line) of every line not inside a ``` fence."""
    fence = False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            yield i, line


def tables(text: str):
    """[(first line index, [rows as lists of cells], index of the line after the table)]."""
    lines = dict(_lines_outside_fences(text))
    out, i, n = [], 0, len(text.splitlines())
    while i < n:
        if lines.get(i, "").startswith("|"):
            start = i
            while lines.get(i, "").startswith("|"):
                i += 1
            rows = [[c.strip() for c in lines[j].strip().strip("|").split("|")] for j in range(start, i)]
            if len(rows) >= 2 and all(set(c) <= set("-: ") for c in rows[1]):
                out.append((start, rows, i))
        else:
            i += 1
    return out


def figures(rows) -> list[str]:
    """The numbers printed in a table's body cells (header and separator rows excluded)."""
    found = []
    for row in rows[2:]:
        for cell in row:
            cell = LINK.sub(lambda m: m.group(0).split("](")[0], CODE.sub("", cell))
            found += FIGURE.findall(cell)
    return found


def parse_source(items: str, page: Path):
    """(linked paths, commands) of a source line; a link's anchor is dropped."""
    paths = [(page.parent / target.split("#")[0]).resolve() for target in LINK.findall(items)
             if not target.startswith(("http://", "https://"))]
    commands = [c.strip("`") for c in CODE.findall(LINK.sub("", items))]
    return paths, commands


@functools.lru_cache(maxsize=None)
def _source_numbers(path: Path, decimals: int) -> frozenset[str]:
    """Every number in a text file, rounded (half-up and half-even) to `decimals` places."""
    out = set()
    quantum = Decimal(1).scaleb(-decimals)
    for raw in SOURCE_NUMBER.findall(path.read_text(errors="replace")):
        try:
            value = Decimal(raw)
        except InvalidOperation:
            continue
        for rounding in (ROUND_HALF_UP, ROUND_HALF_EVEN):
            out.add(str(value.quantize(quantum, rounding=rounding)))
    return frozenset(out)


def figure_in(figure: str, path: Path) -> bool:
    if figure in path.read_text(errors="replace"):
        return True
    plain = figure.replace(",", "")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    return plain in _source_numbers(path, decimals)


def check_page(page: Path, text: str | None = None) -> list[str]:
    """Problems with the sources of a page's number tables (empty: none)."""
    text = page.read_text() if text is None else text
    lines = text.splitlines()
    page_sources = [SOURCE.match(line) for _, line in _lines_outside_fences(text)]
    page_source = next((m for m in page_sources if m and m.group("page")), None)
    problems = []
    for start, rows, end in tables(text):
        shown = figures(rows)
        if not shown:
            continue
        where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{start + 1}"
        after = next((line for line in lines[end:] if line.strip()), "")
        match = SOURCE.match(after)
        if match is None or match.group("page"):
            match = page_source
        if match is None:
            problems.append(f"{where}: a table of numbers without a `Source:` line after it")
            continue
        paths, commands = parse_source(match.group("items"), page)
        if not paths and not commands:
            problems.append(f"{where}: its Source line names no file and no command")
        missing = [p for p in paths if not p.is_file()]
        problems += [f"{where}: source {p} does not exist" for p in missing]
        results = [p for p in paths if p.suffix in TEXT_RESULTS and p.is_file()]
        if results and not missing:
            absent = [f for f in shown if not any(figure_in(f, p) for p in results)]
            if absent:
                problems.append(f"{where}: figures not found in {', '.join(p.name for p in results)}: "
                                f"{', '.join(absent)}")
    return problems


def test_every_number_table_names_a_source_whose_figures_it_prints():
    problems = [p for page in TABLE_PAGES for p in check_page(page)]
    assert not problems, "\n".join(problems)


def test_the_checker_refuses_a_table_without_a_source_or_with_a_wrong_figure(tmp_path):
    result = tmp_path / "r.txt"
    result.write_text("val loss 4.70274, 1,024 tokens\n")
    table = "| run | loss | tokens |\n|---|---:|---:|\n| `nag_2` | {loss} | 1,024 |\n"
    page = tmp_path / "page.md"
    assert check_page(page, table.format(loss="4.703") + "\nSource: [r](r.txt)\n") == []
    assert check_page(page, table.format(loss="4.7027") + "\nSource: `nagjax train`\n") == []
    assert "without a `Source:` line" in check_page(page, table.format(loss="4.703") + "\ntext\n")[0]
    assert "not found" in check_page(page, table.format(loss="4.704") + "\nSource: [r](r.txt)\n")[0]
    assert "does not exist" in check_page(page, table.format(loss="4.703") + "\nSource: [r](x.txt)\n")[0]
    no_numbers = "| a | b |\n|---|---|\n| `x=1` | text |\n"
    assert check_page(page, no_numbers) == []


def test_relative_links_resolve():
    broken = []
    for page in LINK_PAGES:
        for _, line in _lines_outside_fences(page.read_text()):
            for target in LINK.findall(CODE.sub("", line)):
                if target.startswith(("http://", "https://", "mailto:", "#")):
                    continue
                path = (page.parent / target.split("#")[0]).resolve()
                if not path.exists():
                    broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_readme_reads_in_ten_minutes_and_keeps_the_ci_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert 'pip install -e ".[dev]" && python -m pytest -q' in text  # .ci/run runs this line
    assert "pip install -e . && nagjax train" in text
    assert "nagjax[" not in text  # one spelling of extras: pip install -e ".[tpu]"
