"""The documentation holds together: every relative link in README.md, CONTRIBUTING.md and
docs/*.md names a file that exists (and a heading there, for ``#anchor`` links), and the
README stays short enough to read in minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

# [text](target) and ![alt](target), the target up to whitespace or ")"; [label]: target.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: markup dropped, lowercase, punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = CODE_SPAN.sub(lambda m: m.group(2), text).replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading id of a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link that is not a URL with a scheme."""
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        if m := REFERENCE_LINK.match(line):
            targets.append(m.group(1))
        links += [(number, t) for t in targets if not SCHEME.match(t)]
    return links


def broken(path: Path, target: str) -> str | None:
    """Why ``target``, a link in ``path``, does not resolve (None: it does)."""
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
        return f"no file {file_part}"
    if anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
        return f"no heading #{anchor} in {dest.name}"
    return None


def test_the_link_checker_reads_links_and_anchors_as_github_does(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text(
        "# Corrections (POST /corrections)\n## `faceage prepare` (Ray Data)\n## Step\n## Step\n"
        "```\n## not a heading\n[not a link](missing.md)\n```\n"
        "[ok](#corrections-post-corrections) [ok](#faceage-prepare-ray-data) [ok](#step-1)\n"
        "[bad](#not-a-heading) `[in code](missing.md)` [web](https://example.com/x)\n"
        "![img](a.md) [bad file](missing.md#x)\n[ref]: a.md#step\n",
        encoding="utf-8")
    links = relative_links(doc)
    assert [t for _, t in links] == ["#corrections-post-corrections", "#faceage-prepare-ray-data",
                                     "#step-1", "#not-a-heading", "a.md", "missing.md#x",
                                     "a.md#step"]
    problems = {t: broken(doc, t) for _, t in links}
    assert {t for t, why in problems.items() if why} == {"#not-a-heading", "missing.md#x"}


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    problems = [f"{path.relative_to(ROOT)}:{line}: ({target}) {why}"
                for line, target in relative_links(path)
                if (why := broken(path, target)) is not None]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_reads_in_minutes():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference to docs/")
