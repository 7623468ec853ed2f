"""Crash-safe file writes (a reader, or a run killed mid-write, sees the old file or the new one, never a half), loading
checkpoints (one file, or a folder of shards) with one clear error, and the cross-process lock that guards creating
a SQLite store."""

from __future__ import annotations

import fcntl
import json
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


SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")   # transformers' names; first wins


def load_state_dict(path: str | Path, *, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, on the CPU: a ``.safetensors`` file, a ``torch.save`` file (read with
    ``weights_only=True``), or a folder of shards (:func:`load_sharded`); else one ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        return load_sharded(path, what=what, fix=fix)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:       # safetensors raises its own error types
            raise ValueError(f"{what} {path}: not a safetensors file ({type(e).__name__}: {e}); {fix}") from None
    sd = load_weights(path, what=what, fix=fix)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{what} {path}: not a state dict (expected a dict of tensors, got {type(sd).__name__})")
    return sd


def load_sharded(folder: str | Path, *, what: str, fix: str) -> dict[str, torch.Tensor]:
    """A sharded checkpoint in transformers' layout, merged: an index (``model.safetensors.index.json``, else
    ``pytorch_model.bin.index.json``, as ``load_sharded_checkpoint`` prefers them) whose ``weight_map`` maps each key
    to a shard file of the folder. One ValueError naming the file when the index is absent or unreadable, a shard is
    missing, or a shard's keys are not the ones the index gives it."""
    folder = Path(folder)
    index = next((folder / name for name in SHARD_INDEXES if (folder / name).is_file()), None)
    if index is None:
        raise ValueError(f"{what} {folder}: a folder without a shard index ({' or '.join(SHARD_INDEXES)}); {fix}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        weight_map, reason = None, f"{type(e).__name__}: {e}"
    else:
        reason = "its weight_map is not {key: shard file name}"
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{what} {index}: not a shard index ({reason}); {fix}")
    keys_by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, set()).add(key)
    missing = [shard for shard in keys_by_shard if not (folder / shard).is_file()]
    if missing:
        raise ValueError(f"{what} {index}: names the shard {folder / missing[0]}, which is not there ({len(missing)} "
                         f"of {len(keys_by_shard)} shards missing); {fix}")
    sd: dict[str, torch.Tensor] = {}
    for shard, keys in keys_by_shard.items():
        part = load_state_dict(folder / shard, what=what, fix=fix)
        if set(part) != keys:
            raise ValueError(f"{what} {folder / shard}: not the keys {index.name} gives it (lacks "
                             f"{sorted(keys - set(part))[:3]}, has unlisted {sorted(set(part) - keys)[:3]}); {fix}")
        sd.update(part)
    return sd


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
