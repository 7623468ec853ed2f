"""Crash-safe file writes (a reader, or a run killed mid-write, sees the old file or the new one, never a half) and the
cross-process lock that guards creating a SQLite store."""

from __future__ import annotations

import fcntl
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)     # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | Path, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes into the open file) to ``path`` and return the path.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, then ``os.replace`` puts the file
    in place, so the rename is atomic on the same file system. The folder is created when missing. The file gets
    the permissions a plain ``open(path, "wb")`` would give it (0666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
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


def load_weights(path: str | Path, *, what: str, fix: str) -> object:
    """``torch.load(path, weights_only=True)`` onto the CPU, or one ValueError naming the file, the reason and the fix.

    ``what`` names the file's role in the message (e.g. ``"vae_ckpt"``); ``fix`` says what to pass instead.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: not found; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(e))
        reason = found.group(1) if found else type(e).__name__
        raise ValueError(f"{what} {path}: torch.load(weights_only=True) refused it ({reason}); {fix}") from None


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///path` URL, or None for other stores."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


@contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes (an exclusive flock on ``<db>.lock``).

    Two drivers that create the same fresh SQLite file at once both run its schema migrations and one crashes;
    holding this lock while a store is opened (and created) prevents it. Other stores need no lock.
    """
    db = sqlite_path(url)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f"{db.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
