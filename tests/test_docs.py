"""The documentation's links: every relative link and anchor in README.md, CONTRIBUTING.md and docs/*.md
resolves, anchors as GitHub makes them from headings. The README stays a five-minute read."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md", *(REPO_ROOT / "docs").glob("*.md")])
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"(?<!\\)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK_TEXT = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, every character but letters, marks,
    numbers, connector punctuation (`_`), spaces and hyphens dropped, spaces turned into hyphens."""
    text = LINK_TEXT.sub(r"\1", heading).replace("`", "").lower()
    kept = "".join(
        character for character in text
        if character in " -" or unicodedata.category(character)[0] in "LMN" or unicodedata.category(character) == "Pc"
    )
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text()):
        if match := HEADING.match(line):
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code."""
    found = []
    for number, line in enumerate(prose_lines(page.read_text()), 1):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(REPO_ROOT)}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file {destination.relative_to(REPO_ROOT)}")
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            problems.append(f"{where}: no heading with anchor #{anchor} in {destination.relative_to(REPO_ROOT)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert links(page) or page.name != "README.md", "the README links its pages"
    assert not broken_links(page), "\n".join(broken_links(page))


def test_every_docs_page_is_linked_from_the_readme():
    readme_targets = {target.partition("#")[0] for _, target in links(REPO_ROOT / "README.md")}
    unlinked = [page.name for page in (REPO_ROOT / "docs").glob("*.md") if f"docs/{page.name}" not in readme_targets]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_is_a_five_minute_read():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_github_slugs():
    assert github_slug("Flags (all scripts)") == "flags-all-scripts"
    assert github_slug("Answers from a finetuned model: `predict.py`") == "answers-from-a-finetuned-model-predictpy"
    assert github_slug("The recipe's measurements") == "the-recipes-measurements"
    assert github_slug("Checking the samples: `--preview_samples`") == "checking-the-samples---preview_samples"
    assert github_slug("See [the data](data.md) page") == "see-the-data-page"
    assert github_slug("Über — déjà vu") == "über--déjà-vu"


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-part-1) [ok](#page) [web](https://example.com/x#y) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad](other.md#no-part)\n```\n[in code](nowhere.md)\n# not a heading\n```\n"
    )
    assert broken_links(page) == [
        "page.md:4: missing.md: no such file missing.md",
        "page.md:4: other.md#no-part: no heading with anchor #no-part in other.md",
    ]
