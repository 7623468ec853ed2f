"""Prompt sets of text-to-image sweeps: a CSV in the format of Switti's eval prompt files, drawn deterministically.

Switti ships ``eval_prompts/coco.csv``, ``mjhq.csv`` and ``parti-prompts-eval.csv``: a header row, an index column,
and the prompt in a column named ``captions``; ``caption``, ``prompt`` and ``text`` are accepted as well. A sweep
gives image i prompt ``i·P mod N`` of the N prompts (:func:`pipeline.core.sampling.spread_prompts`).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

PROMPT_COLUMNS = ("captions", "caption", "prompt", "prompts", "text")


@lru_cache(maxsize=8)
def _read(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        column = next((c for c in PROMPT_COLUMNS if rows.fieldnames and c in rows.fieldnames), None)
        if column is None:
            raise ValueError(f"prompts {path}: no prompt column (one of {', '.join(PROMPT_COLUMNS)}) in its header "
                             f"{rows.fieldnames}; give a CSV like Switti's eval_prompts/coco.csv")
        prompts = tuple(row[column] for row in rows if row.get(column) is not None)
    if not prompts:
        raise ValueError(f"prompts {path}: no prompts in column {column!r}")
    return prompts


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """The prompts of a CSV, in file order (cached while the file is unchanged). ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts {path}: not found; give a CSV of prompts (e.g. Switti's eval_prompts/coco.csv)")
    stat = path.stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns)
