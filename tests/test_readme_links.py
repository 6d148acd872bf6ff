"""The README and docs/ point at what exists: every relative link names a file of the repository, every ``#anchor``
a heading of the page it points into (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens), and
every result file the pages cite under ``bench/results/`` (in backticks, whole) is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED = re.compile(r"`(bench/results/[A-Za-z0-9_./-]+)`")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading's text."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_and_cited_result_exists(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    missing = [cited for cited in CITED.findall(text)
               if not cited.endswith("...") and not (ROOT / cited.rstrip(".")).exists()]  # "name_...": a pattern
    assert not broken and not missing, f"{page.name}: links {broken}, cited results {missing}"


def test_the_pages_are_found() -> None:
    assert {page.name for page in PAGES} >= {"README.md", "benchmarks.md", "calibrate.md", "layout.md"}
