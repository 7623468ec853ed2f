"""Where the benchmarks write their tables: one ``## title`` section per script in docs/BENCHMARKS.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.data.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"


def provenance(path: str) -> str:
    """Where a checkpoint comes from: the last commit that changed it, when it is the committed file; else its path."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(ROOT):
        unchanged = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", str(resolved)])
        commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(resolved)],
                                capture_output=True, text=True).stdout.strip()
        if unchanged.returncode == 0 and commit:
            return f"{resolved.relative_to(ROOT)} as committed in {commit}"
    return str(path)


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file, leaving the other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}"
    atomic_write(path, (text.rstrip() + "\n").encode())


def publish(body: str, title: str, write: bool) -> None:
    """Print a benchmark's section; with `write`, also put it in docs/BENCHMARKS.md."""
    print(body)
    if write:
        write_section(BENCHMARKS, title, body)
        print(f"wrote the ## {title} section of {BENCHMARKS}")
