"""The user docs against the code: the README's size, its property table against config.PROPERTIES, the
diagnostics table against config.DIAGNOSTICS, and every file the docs point at.

The tables are parsed from the Markdown as written, so a property added to config.py without a README row (or a
values cell that drifts from the code) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_offload.config import DIAGNOSTICS, PROPERTIES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 8192


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def table_after(text: str, header: tuple[str, ...]) -> list[list[str]]:
    """Cells of the rows of the first Markdown table whose header row is `header`, separator row skipped."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip().startswith("|") and tuple(split_row(line)) == header:
            break
    else:
        raise AssertionError(f"no table with header {' | '.join(header)}")
    assert set(lines[start + 1].replace("|", "").strip()) <= set("-: "), "header not followed by a separator row"
    rows = []
    for line in lines[start + 2:]:
        if not line.strip().startswith("|"):
            break
        cells = split_row(line)
        assert len(cells) == len(header), f"row with {len(cells)} cells, not {len(header)}: {line}"
        rows.append(cells)
    return rows


def split_row(line: str) -> list[str]:
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), f"not a table row: {line}"
    return [cell.strip() for cell in inner[1:-1].split("|")]


def name_cell(cell: str) -> str:
    match = re.fullmatch(r"`([A-Z_]+)`", cell)
    assert match, f"the first cell names one variable in backticks: {cell!r}"
    return match.group(1)


def test_readme_fits_in_8_kib():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}"


def test_readme_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[test]" && '
            'moe-offload generate "def fibonacci(n):"') in text
    assert "\npython -m pytest tests -q -n auto --dist loadfile\n" in text


def test_readme_property_table_is_config_properties():
    rows = table_after(README.read_text(encoding="utf-8"), ("property", "values", "meaning"))
    assert [name_cell(r[0]) for r in rows] == list(PROPERTIES)
    for name, values, meaning in rows:
        assert values == PROPERTIES[name_cell(name)][2], name
        assert meaning, f"{name} has no meaning"


def test_diagnostics_table_is_config_diagnostics():
    rows = table_after((DOCS / "diagnostics.md").read_text(encoding="utf-8"), ("switch", "values", "what it pins"))
    assert [name_cell(r[0]) for r in rows] == list(DIAGNOSTICS)
    for name, values, pins in rows:
        assert values == DIAGNOSTICS[name_cell(name)][2], name
        assert pins, f"{name} pins nothing"


def test_diagnostics_are_not_in_the_readme_property_table():
    rows = table_after(README.read_text(encoding="utf-8"), ("property", "values", "meaning"))
    assert not {name_cell(r[0]) for r in rows} & set(DIAGNOSTICS)


# `bench/results/...` and `docs/...` as written anywhere in the text (relative to the repository root), and the
# targets of Markdown links (relative to the file), except web addresses and anchors.
_ROOT_PATH = re.compile(r"(?<![\w/.-])((?:bench/results|docs)/[\w./{},*-]*[\w*}])")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for alt in match.group(1).split(",")
            for p in expand_braces(path[:match.start()] + alt + path[match.end():])]


def mentioned_paths(doc: Path) -> list[tuple[str, Path]]:
    text = doc.read_text(encoding="utf-8")
    found = [(p, ROOT / p) for written in _ROOT_PATH.findall(text) for p in expand_braces(written)]
    found += [(t, (doc.parent / t).resolve()) for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    return found


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_in_docs_exist(doc):
    missing = [written for written, path in mentioned_paths(doc)
               if not (path.exists() or any(path.parent.glob(path.name)))]
    assert not missing, f"{doc.relative_to(ROOT)} points at paths that do not exist: {missing}"


def _module_files() -> set[str]:
    return {str(p.relative_to(ROOT)) for folder in ("moe_offload", "tests", "tools", "bench")
            for p in (ROOT / folder).rglob("*.py")}


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_in_docs_exist(doc):
    """A `module.py` named in backticks is a file of the repository (package, tests, tools, bench), by its path or
    by its tail (`kernels/triton_moe.py`, `cache.py`)."""
    files = _module_files()
    named = set(re.findall(r"`([\w/]+\.py)`", doc.read_text(encoding="utf-8")))
    missing = [n for n in sorted(named) if not any(f == n or f.endswith("/" + n) for f in files)]
    assert not missing, f"{doc.relative_to(ROOT)} names modules that do not exist: {missing}"


def test_design_layout_lists_every_module():
    """docs/design.md's package layout names every module of the package (by file name), and only those."""
    text = (DOCS / "design.md").read_text(encoding="utf-8")
    section = text[text.index("## Package layout"):]
    block = section[section.index("```"):]
    block = block[3:block.index("```", 3)]
    listed = set(re.findall(r"[\w]+\.py", block))
    modules = {p.name for p in (ROOT / "moe_offload").rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), f"modules missing from the layout: {sorted(modules - listed)}"
    assert listed - modules - {"__init__.py"} == set(), f"layout names no such module: {sorted(listed - modules)}"


def test_the_checks_can_fail():
    """The parsers find real problems: a drifted values cell, a missing row, a path that is not there."""
    text = README.read_text(encoding="utf-8")
    first = next(iter(PROPERTIES))
    drifted = text.replace(PROPERTIES[first][2], PROPERTIES[first][2] + " (changed)", 1)
    rows = table_after(drifted, ("property", "values", "meaning"))
    assert rows[0][1] != PROPERTIES[first][2]
    dropped = "\n".join(line for line in text.splitlines() if not line.startswith(f"| `{first}`"))
    assert [name_cell(r[0]) for r in table_after(dropped, ("property", "values", "meaning"))] != list(PROPERTIES)
    assert _ROOT_PATH.findall("see bench/results/no-such-file.json.") == ["bench/results/no-such-file.json"]
    assert expand_braces("bench/results/a{,-b}.json") == ["bench/results/a.json", "bench/results/a-b.json"]
