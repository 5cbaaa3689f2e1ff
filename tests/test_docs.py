"""The documentation holds together: every relative link in README.md and docs/*.md reaches a file
and, with a #anchor, a heading of it (GitHub's anchor rules); every "docs/X.md, 'Heading'" a
comment cites names a heading that exists; nothing cites the design note that is not in the
repository; the README stays short enough to read first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
SKIP_DIRS = {".git", ".venv", ".venv-gpu", "runs", "build", "__pycache__", ".pytest_cache", "out"}
SOURCE_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".pbtxt", ".sh", ".yml", ".yaml", ".json", ""}
README_MAX_LINES = 250

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
# A comment's citation of a docs page and heading: docs/design.md, 'Gumbel read' / docs/x.md ("Y")
CITATION = re.compile(r"docs/([\w.-]+\.md)(?:'s)?\)?,?\s*\(?\s*(?:#\s*)?['\"]([^'\"\n]+)['\"]")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup dropped (link text and code text kept),
    lowercased, everything but letters, digits, spaces, '-' and '_' removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def headings(path: Path) -> list[str]:
    return [m.group(2) for _, line in prose_lines(path) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    """Every anchor of the page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        out.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)  # a link-like text inside inline code is not a link
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                found.append((number, target))
    return found


def broken_link(page: Path, target: str) -> str | None:
    """Why `target`, linked from `page`, does not resolve; None when it does."""
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
        return f"no file {_shown(dest)}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"no heading with anchor #{anchor} in {_shown(dest)}"
    return None


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def project_files():
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in SOURCE_SUFFIXES or path.name == "Makefile"):
            try:
                yield rel, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


# ------------------------------------------------------------------------------------- the checker

@pytest.mark.parametrize("heading, slug", [
    ("How to read `dmf bench`", "how-to-read-dmf-bench"),
    ("Serving: export, Python API, command line", "serving-export-python-api-command-line"),
    ("dmf — Dual Memory Fusion", "dmf--dual-memory-fusion"),
    ("Writer and its top-k", "writer-and-its-top-k"),
    ("The [artifact](artifact.md) contract", "the-artifact-contract"),
    ("snake_case stays", "snake_case-stays"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checker_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n\n```\n## not a heading\n```\n")
    page.write_text("[ok](other.md#a-section) [gone](missing.md) [bad](other.md#not-a-heading) "
                    "[web](https://example.com) `[code](nowhere.md)`\n")
    targets = [t for _, t in relative_links(page)]
    assert targets == ["other.md#a-section", "missing.md", "other.md#not-a-heading"]
    assert broken_link(page, "other.md#a-section") is None
    assert "no file" in broken_link(page, "missing.md")
    assert "no heading" in broken_link(page, "other.md#not-a-heading")


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n## Limits\ntext\n## Limits\n")
    assert anchors(page) == {"top", "limits", "limits-1"}


# -------------------------------------------------------------------------------------- the project

@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    problems = [f"{page.relative_to(REPO)}:{number}: ({target}) {why}"
                for number, target in relative_links(page) if (why := broken_link(page, target))]
    assert not problems, "\n".join(problems)


def test_docs_cited_by_heading_exist():
    """'docs/design.md, "Gumbel read"' in a comment must name a heading of that page."""
    known = {page.name: {github_slug(h) for h in headings(page)} for page in DOCS}
    problems = []
    for rel, text in project_files():
        if rel == Path(__file__).relative_to(REPO):  # its docstrings show the form, not citations
            continue
        for name, title in CITATION.findall(text):
            if name not in known:
                problems.append(f"{rel}: cites docs/{name}, which does not exist")
            elif github_slug(title) not in known[name]:
                problems.append(f"{rel}: cites docs/{name}, {title!r}: no such heading")
    assert not problems, "\n".join(problems)


def test_nothing_cites_the_design_note_outside_the_repository():
    marker = "DESIGN" + " §"  # spelled in two parts so this file does not match itself
    hits = [f"{rel}:{n}" for rel, text in project_files()
            for n, line in enumerate(text.splitlines(), 1) if marker in line]
    assert not hits, f"{marker} cited in: " + ", ".join(hits)


def test_install_hints_use_the_distribution_name(monkeypatch):
    """`dmf` on the package index is another project: an extra is installed as dmf-ser[...]
    (dmf.install_hint), never dmf[...]. bench/results holds recorded output and is left as it was."""
    wrong = re.compile(r"(?<![\w-])dmf\[[a-z0-9,-]+\]")
    hits = [f"{rel}:{n}" for rel, text in project_files() if rel.parts[:2] != ("bench", "results")
            for n, line in enumerate(text.splitlines(), 1) if wrong.search(line)]
    assert not hits, "install hints naming the wrong distribution: " + ", ".join(hits)
    import dmf
    from dmf import DISTRIBUTION, install_hint

    # from a clone (no release yet): reinstall that clone with the extra; from a wheel: the index name
    assert install_hint("serve") == f'pip install -e "{REPO.resolve()}[serve]"'
    monkeypatch.setattr(dmf, "source_checkout", lambda: None)
    assert DISTRIBUTION != "dmf" and install_hint("serve") == f'pip install "{DISTRIBUTION}[serve]"'


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; the detail belongs in docs/"
