"""Crash-safe file writes: a reader (or a run killed mid-write) sees the old file or the new one, never a half."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes into the open file) to ``path`` and return the path.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, then ``os.replace`` puts the file
    in place, so the rename is atomic on the same file system. The folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
