"""Crash-safe writes and the one error path for weights files."""

import os
import stat

import pytest
import torch

from pipeline.data.files import atomic_write, load_weights


def test_atomic_write_bytes_or_writer_with_plain_permissions(tmp_path):
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as f:
        f.write(b"x")
    path = atomic_write(tmp_path / "sub" / "a.bin", b"hello")
    assert path.read_bytes() == b"hello"
    atomic_write(path, lambda f: f.write(b"world"))
    assert path.read_bytes() == b"world"
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "a.pt", b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_load_weights_round_trip_and_one_line_errors(tmp_path):
    sd = {"w": torch.arange(3.0)}
    atomic_write(tmp_path / "ok.pt", lambda f: torch.save(sd, f))
    assert torch.equal(load_weights(tmp_path / "ok.pt", what="w", fix="f")["w"], sd["w"])
    with pytest.raises(ValueError, match=r"^ckpt .*missing\.pt: not found; pass another$"):
        load_weights(tmp_path / "missing.pt", what="ckpt", fix="pass another")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match=r"^ckpt .*junk\.pt: torch\.load\(weights_only=True\) refused it .*; fix it$"):
        load_weights(tmp_path / "junk.pt", what="ckpt", fix="fix it")
