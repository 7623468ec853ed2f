"""What the real-process tests read from /proc and from live stores: descendants of a process, what a process runs,
the TCP ports processes listen on, and trial states of an Optuna SQLite store while a sweep writes it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sqlite3
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of a process (from /proc; the Ray daemons and actors a driver started)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap(pids: list[int]) -> None:
    """SIGKILL what a killed driver's Ray leaves behind (its agents may outlive it for a while)."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _hex_address(field: str) -> tuple[str, int]:
    """'0100007F:1F90' (IPv4) or 32 hex digits + port (IPv6) from /proc/net/tcp* -> ('127.0.0.1', 8080).

    An IPv4-mapped IPv6 address (a dual-stack socket bound to ::ffff:127.0.0.1) comes back as its IPv4 address.
    """
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))  # host-endian words
    return str(getattr(ip, "ipv4_mapped", None) or ip), int(port, 16)


def listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of `pids` holds open."""
    owner: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owner[target[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN; field 9: the socket's inode
                found.append((*_hex_address(fields[1]), owner[fields[9]]))
    return found


def trial_states(db: Path, study: str) -> dict[str, int]:
    """Counts of trial states of one study, read straight from the SQLite file (read-only; {} before it exists)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(
                "SELECT t.state, count(*) FROM trials t JOIN studies s ON t.study_id = s.study_id "
                "WHERE s.study_name = ? GROUP BY t.state", (study,)).fetchall()
    except sqlite3.OperationalError:  # no file or tables yet, or a writer holds the lock
        return {}
    return dict(rows)
