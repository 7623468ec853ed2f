"""A Ray cluster of several nodes on this machine, cut off from any network but loopback: for tests/test_cluster.py
(through tests/cluster_run.py) and bench/bench_cluster.py.

`in_namespace` runs a program as the only one of fresh network (loopback only), PID and mount namespaces (needs
root); inside, `enter` brings loopback up and gives Ray a private temp folder, `start_nodes` starts a head and more
nodes on 127.0.0.1 with token authentication, and `kill_all` ends them. Nothing started in there outlives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from processes import cmdline, reap

HEAD = "127.0.0.1:6379"


def in_namespace(argv: list[str], *, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run argv as the only program of fresh network, PID and mount namespaces; stdout and stderr captured.

    bash is PID 1 there: it reaps the orphaned Ray daemons, and when it exits the kernel kills whatever is left in
    the PID namespace; --kill-child kills it if unshare itself is killed (e.g. by the timeout).
    """
    return subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", '"$@"; exit $?', "bash",
         *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def processes_in(netns: int) -> list[int]:
    """Every process (seen from outside) in the network namespace with this inode number."""
    found = []
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            if ns.stat().st_ino == netns:
                found.append(int(ns.parent.parent.name))
        except OSError:
            continue
    return found


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def enter(home: Path) -> int:
    """Inside the namespaces: loopback up, Ray's temp folder on a private tmpfs, token authentication on with a
    fresh token under `home`/.ray; returns the network namespace's inode number (for `processes_in`)."""
    sh("ip", "link", "set", "lo", "up")
    Path("/tmp/ray").mkdir(exist_ok=True)
    sh("mount", "-t", "tmpfs", "tmpfs", "/tmp/ray")
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(HOME=str(home), RAY_TMPDIR="/tmp", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                      PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    sh("ray", "get-auth-token", "--generate")
    return os.stat("/proc/self/ns/net").st_ino


def raylets() -> dict[int, str]:
    """pid -> Ray node id of every live raylet."""
    found = {}
    for pid in map(int, (p.name for p in Path("/proc").glob("[0-9]*"))):
        args = cmdline(pid).split()
        if args and args[0].endswith("/raylet"):
            found[pid] = next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
    return found


def start_nodes(cpus: list[int], hidden: str | None = None) -> list[tuple[int, str]]:
    """A head with cpus[0] CPUs and one more node per further entry; (raylet pid, node id) of each, head first.

    With `hidden`, the nodes but the head run in a mount namespace of their own where that folder is an empty tmpfs
    (files the driver sees and they do not).
    """
    sh("ray", "start", "--head", f"--num-cpus={cpus[0]}", "--include-dashboard=false", "--disable-usage-stats")
    nodes = list(raylets().items())
    for n in cpus[1:]:
        join = ["ray", "start", f"--address={HEAD}", f"--num-cpus={n}"]
        if hidden is not None:
            join = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs "$0" && exec "$@"', hidden, *join]
        sh(*join)
        nodes += [item for item in raylets().items() if item not in nodes]
    return nodes


def kill_all(keep: set[int]) -> None:
    """SIGKILL every process of the namespace but PID 1, this one and `keep` (e.g. sweep drivers)."""
    keep = {1, os.getpid(), *keep}
    reap([int(p.name) for p in Path("/proc").glob("[0-9]*") if int(p.name) not in keep])
