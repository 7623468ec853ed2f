"""Where the benchmarks write their tables: one ``## title`` section per script in docs/BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.files import atomic_write

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file, leaving the other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}"
    atomic_write(path, (text.rstrip() + "\n").encode())
