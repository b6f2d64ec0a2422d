"""The README and the pages under docs/: every relative link names a file that exists and, with a
`#anchor`, a heading of that file (GitHub's anchors); the README stays a front door."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return "\n".join(
        part for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0
    )


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a file's headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.*)$", prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def broken_links(pages: list[Path]) -> list[str]:
    broken = []
    for page in pages:
        label = page.relative_to(REPO) if page.is_relative_to(REPO) else page.name
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{label}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{label}: {target} (no such heading)")
    return broken


def test_every_relative_link_resolves():
    assert broken_links(PAGES) == []


def test_the_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title `x`\n\n[ok](#title-x) [gone](b.md) [bad](#nothing)\n")
    found = broken_links([tmp_path / "a.md"])
    assert [line.split(": ", 1)[1] for line in found] == [
        "b.md (no such file)",
        "#nothing (no such heading)",
    ]


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 360
