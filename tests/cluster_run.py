"""The two-node Ray cluster of tests/test_cluster.py, run inside the namespaces that test creates (not a test module).

``python tests/cluster_run.py WORK`` runs as the only program of a fresh network namespace (loopback only), PID
namespace and mount namespace, so every Ray process it starts sees only its own processes and 127.0.0.1, and dies
with the namespace. WORK/plan.json names the sweep arguments; WORK/results.json gets what happened:

1. a head and a second node, 1 CPU each, token authentication (the token under WORK/home/.ray); the second node
   runs in a mount namespace of its own where the folder ``plan["hidden"]`` is an empty tmpfs;
2. the sweep without RAY_AUTH_MODE=token: it must be refused, naming the token;
   sweep ``hidden``, whose checkpoints live in that folder: it must fail before any trial;
3. sweep ``lost``: the second node is SIGKILLed while its actor evaluates a proxy trial, then, in the confirm stage,
   every Ray process (the whole cluster) is SIGKILLed; the driver must exit on its own;
4. the cluster is started again and the same ``lost`` command is rerun to the end.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from loopback import enter, kill_all, start_nodes
from processes import cmdline, descendants, reap, trial_states

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 600


def start_cluster(hidden: str) -> dict[str, tuple[int, str]]:
    """Head and second node, 1 CPU each, `hidden` empty on the second; {"head": (raylet pid, node id), "node2": ...}."""
    head, node2 = start_nodes([1, 1], hidden)
    return {"head": head, "node2": node2}


def kill_cluster() -> None:
    """SIGKILL every Ray process of the namespace (all but the sweep drivers)."""
    kill_all({p.proc.pid for p in LIVE})


LIVE: list[Sweep] = []  # sweep drivers running now


class Sweep:
    """One `python -m pipeline.sweep` process; its stdout and stderr go to LOG.out and LOG.err."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", *args], cwd=REPO, stdout=out,
                                         stderr=err, env=env)
        LIVE.append(self)

    def finish(self) -> dict[str, object]:
        rc = self.proc.wait(timeout=RUN_TIMEOUT_S)
        LIVE.remove(self)
        return {"rc": rc, "stdout": self.out.read_text(), "stderr": self.err.read_text()}


def parent_status(db: Path, experiment: str) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        [(status,)] = con.execute(
            "SELECT r.status FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
            "JOIN tags t ON t.run_uuid = r.run_uuid WHERE e.name = ? AND t.key = 'guidetune.role' "
            "AND t.value = 'parent'", (experiment,)).fetchall()
    return status


def lose_nodes(sweep: Sweep, nodes: dict[str, tuple[int, str]], db: Path) -> dict[str, object]:
    """Kill the second node while it evaluates a proxy trial, then the whole cluster in the confirm stage."""
    seen: dict[str, object] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    node2 = nodes["node2"][0]
    while sweep.proc.poll() is None and time.monotonic() < deadline:
        if "node2" not in seen and trial_states(db, "lost/proxy").get("COMPLETE", 0) >= 1:
            on_node2 = descendants(node2)
            if any(cmdline(p).startswith("ray::Worker.evaluate") for p in on_node2):
                reap([node2, *on_node2])
                seen["node2"] = {"at": time.time(), "proxy": trial_states(db, "lost/proxy")}
        if "node2" in seen and "cluster" not in seen:
            confirm = trial_states(db, "lost/confirm")
            if confirm.get("COMPLETE", 0) >= 1 and confirm.get("RUNNING", 0) >= 1:
                kill_cluster()
                seen["cluster"] = {"at": time.time(), "confirm": confirm}
        time.sleep(0.05)
    return seen


def main(work: Path) -> int:
    plan = json.loads((work / "plan.json").read_text())
    results: dict[str, object] = {"netns": enter(work / "home")}
    (work / "results.json").write_text(json.dumps(results))
    db = Path(plan["root"]) / "optuna.db"
    wall_s: dict[str, float] = {}
    results["wall_s"] = wall_s
    clock = time.monotonic()

    def took(phase: str) -> None:
        nonlocal clock
        wall_s[phase], clock = time.monotonic() - clock, time.monotonic()

    try:
        nodes = start_cluster(plan["hidden"])
        results["nodes"] = {name: node_id for name, (_, node_id) in nodes.items()}
        took("start")
        no_token = Sweep(plan["args"], work / "no_token", {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"})
        hidden = Sweep(plan["hidden_args"], work / "hidden")  # at the same time: the first one only waits
        results["no_token"], results["hidden"] = no_token.finish(), hidden.finish()
        took("refused")
        lost = Sweep(plan["args"], work / "lost")
        results["kills"] = lose_nodes(lost, nodes, db)
        results["lost"] = lost.finish()
        results["parent_after_loss"] = parent_status(Path(plan["root"]) / "mlflow.db", "lost")
        took("lost")
        kill_cluster()
        results["nodes_again"] = {name: node_id for name, (_, node_id) in start_cluster(plan["hidden"]).items()}
        took("restart")
        results["resumed"] = Sweep(plan["args"], work / "resumed").finish()
        took("resumed")
    finally:
        for sweep in LIVE:
            sweep.proc.send_signal(signal.SIGKILL)
        kill_cluster()
        (work / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
