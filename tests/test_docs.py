"""README.md and docs/: relative links resolve, the README stays short, product text and file
names say what is true now (history belongs in CHANGELOG.md and dated bench/results files),
and every marked example names the test that runs it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 300

# Development history in product text: narration of work sessions and rounds, issue numbers.
HISTORY = re.compile(
    r"this round|of the round|(first|second|third|fourth|fifth|sixth) session|issue [0-9]{1,3}\b"
    r"|last round|last session|later in the round",
    re.IGNORECASE,
)
# The same in file names, where a stage is written as a number (results-session5.md).
HISTORY_IN_NAMES = re.compile(HISTORY.pattern + r"|(session|round)[-_ ]?[0-9]", re.IGNORECASE)
# Folders that are not the project's own files.
PRUNED = {".git", ".venv", ".cache", ".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__",
          "build", "node_modules"}
# Links to pages that land with a feature being built beside this one.
PENDING: set = set()

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
EXAMPLE = re.compile(r"<!-- example: (\S+) \(run by (tests/\S+\.py)\) -->\n```(\w+)\n(.*?)```", re.S)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def example(name: str, lang: str = "python") -> str:
    """The code of the example marked ``<!-- example: NAME ... -->`` in README.md or docs/."""
    for page in pages():
        for match in EXAMPLE.finditer(page.read_text(encoding="utf-8")):
            if match.group(1) == name:
                assert match.group(3) == lang, f"{page.name}: example {name!r} is {match.group(3)}, not {lang}"
                return match.group(4)
    raise AssertionError(f"no example {name!r} in README.md or docs/")


def prose(text: str) -> str:
    """The text without code: links inside code blocks and inline code are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(page: Path) -> list[str]:
    links = [a or b for a, b in LINK.findall(prose(page.read_text(encoding="utf-8")))]
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link, re.I)]


def test_docs_pages_exist():
    for name in ("cli", "python-api", "streaming", "server", "hardware", "long-inputs", "accuracy", "ray",
                 "performance", "architecture", "development"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("page", [*pages(), REPO / "bench" / "README.md"], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if target in PENDING and not target.exists():
            continue
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}); move depth to docs/"


def product_text() -> list[Path]:
    results = REPO / "bench" / "results"
    return [*pages(), REPO / "bench" / "README.md", *sorted(results.glob("*.md"))]


@pytest.mark.parametrize("page", product_text(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_product_text_has_no_history(page):
    hits = [f"line {n}: {line.strip()[:100]}" for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            if HISTORY.search(line)]
    assert not hits, f"{page.relative_to(REPO)} narrates history (move it to CHANGELOG.md): " + "; ".join(hits)


def test_file_names_have_no_history():
    hits = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in PRUNED and not d.endswith(".egg-info")]
        for name in [*dirs, *files]:
            path = Path(root, name).relative_to(REPO)
            if path.as_posix() != "CHANGELOG.md" and HISTORY_IN_NAMES.search(name):
                hits.append(path.as_posix())
    assert not hits, f"file names that narrate history (name results by date and machine): {hits}"


def test_examples_name_the_test_that_runs_them():
    names = []
    for page in pages():
        for match in EXAMPLE.finditer(page.read_text(encoding="utf-8")):
            name, test_file = match.group(1), REPO / match.group(2)
            names.append(name)
            assert test_file.is_file(), f"{page.name}: example {name!r} names {match.group(2)}, which does not exist"
            assert f'"{name}"' in test_file.read_text(encoding="utf-8"), \
                f"{page.name}: example {name!r} is not run by {match.group(2)}"
    assert len(names) == len(set(names)), f"example names repeat: {sorted(names)}"
    assert "guard_stream" in names
