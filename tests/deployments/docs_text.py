"""The README's and docs/'s text cut into what the docs tests check: code blocks, code spans, links.

No Ray, no model: plain text, so that the tests that keep the docs true run in well under a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from deployments.config import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
# Pages whose commands, files, flags and config snippets are checked: the README and the docs pages
# that say what is true now. The log (history) and the pages other work owns are checked for links and
# peer ratios only.
CHECKED = [
    README,
    *(
        DOCS / f"{name}.md"
        for name in (
            "performance", "ports", "cluster", "observability", "models", "openai", "llm-engine",
            "guided", "kv_cache", "engine",
        )
    ),
]  # fmt: skip
ALL_PAGES = [README, *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.M)


@dataclass(frozen=True, slots=True)
class Block:
    page: str
    lang: str
    body: str


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(path: Path) -> list[Block]:
    return [Block(rel(path), m.group(1), m.group(2)) for m in _FENCE.finditer(read(path))]


def prose(path: Path) -> str:
    """The page without its fenced code blocks."""
    return _FENCE.sub("", read(path))


def code_spans(path: Path) -> list[str]:
    return _SPAN.findall(prose(path))


def command_texts(path: Path) -> list[str]:
    """Every inline code span and every line of a shell (or unlabelled) code block."""
    lines = [line for b in code_blocks(path) if b.lang in ("", "bash", "sh") for line in b.body.splitlines()]
    return code_spans(path) + lines


def links(path: Path) -> list[str]:
    return _LINK.findall(prose(path))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, text in _HEADING.findall(prose(path)):
        base = slug(text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def sections(path: Path) -> list[tuple[str, str]]:
    """(heading, text up to the next heading) for each heading; the text before the first is ''."""
    text = read(path)
    masked = _FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # a `# comment` is no heading
    starts = [(m.start(), m.group(2)) for m in _HEADING.finditer(masked)]
    bounds = [(0, ""), *starts]
    ends = [s for s, _ in starts] + [len(text)]
    return [(title, text[start:end]) for (start, title), end in zip(bounds, ends, strict=True)]
