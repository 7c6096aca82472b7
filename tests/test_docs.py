"""The pages in docs/: their python blocks run, and every relative link in them and in the
README points to a file (and heading) that exists.

Each page's ```python blocks run in order in one namespace, in a scratch directory set up as
for the README's (``tests/test_readme.py``), one test per page; a page without python blocks
has no test. Blocks fenced as ``py`` are shown, never run. A page whose blocks print must say
what in ``PRINTS``, so its test checks the output, not only that nothing raised."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_readme import REPO, python_blocks, run_blocks

PAGES = sorted((REPO / "docs").glob("*.md"))
RUN = [page for page in PAGES if python_blocks(page)]

# page name -> a pattern that the output of its blocks must match
PRINTS: dict[str, str] = {}


@pytest.mark.parametrize("page", RUN, ids=[page.name for page in RUN])
def test_docs_page_blocks_run(page, tmp_path, capsys):
    blocks = python_blocks(page)
    run_blocks(blocks, f"docs/{page.name}", tmp_path)
    out = capsys.readouterr().out
    if any("print(" in block for block in blocks):
        assert page.name in PRINTS, f"docs/{page.name} prints: say what in PRINTS"
    if page.name in PRINTS:
        assert re.search(PRINTS[page.name], out), out


def _unfenced(text: str) -> str:
    """The text without its fenced code blocks."""
    return re.sub(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where link syntax is not a link."""
    return re.sub(r"`[^`]*`", "``", _unfenced(text))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    anchors: set[str] = set()
    count: dict[str, int] = {}
    for line in _unfenced(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = count.get(slug, 0)
            count[slug] = n + 1
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def _links(page: Path) -> list[str]:
    text = _prose(page.read_text())
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return inline + re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)


def test_relative_links_resolve():
    broken = []
    checked = 0
    for page in [REPO / "README.md", *PAGES]:
        for target in _links(page):
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            checked += 1
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif not dest.is_relative_to(REPO):
                broken.append(f"{where} (outside the repository)")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{where} (no such heading)")
    assert checked > 0
    assert not broken, "\n".join(broken)
