"""A real two-node Ray cluster on one machine: a head and a second node on 127.0.0.1, each with 1 CPU, inside a
network namespace with only the loopback interface (and PID and mount namespaces, so that nothing outlives the run);
see tests/cluster_run.py for what runs in there. Needs root (`unshare`), as CI has.

One module fixture runs it all; the tests read what the sweeps left in the stores: a driver without the cluster's
token is refused; a worker whose node lacks the checkpoints fails the sweep before any trial; trials run on both
nodes; the second node is lost mid-trial and the sweep goes on on the head, re-running that trial; the whole cluster
is lost, the driver exits with one line, and the same command resumes the sweep once the cluster is back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import optuna
import pytest
from loopback import HEAD, in_namespace, processes_in
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_fixtures import (
    LEDGERS,
    SMALL_DESIGN,
    SMALL_STUDIES,
    SMALL_SWEEP,
    SMALL_TRIALS,
    micro_overrides,
    ran,
    study_trials,
    write_micro_backbone,
)

from pipeline.runtime.tracking import HOST_TAG, NODE_TAG, PARENT_TAG, ROLE_TAG, STAGE_TAG, TRIAL_TAG
from tuners.studies import RECORD

TESTS = Path(__file__).resolve().parent
CLUSTER = ["launcher=cluster", f"launcher.address={HEAD}", "launcher.workers=2", "launcher.cpus_per_worker=1"]
RUN_TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare(1) for the network namespace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    root, hidden = d / "root", d / "hidden"
    shown = micro_overrides(write_micro_backbone(d / "ckpt"), root)
    plan = {
        "root": str(root),
        "hidden": str(hidden),
        "args": [*shown, *SMALL_SWEEP, *CLUSTER, "sweep.name=lost"],
        "hidden_args": [*micro_overrides(write_micro_backbone(hidden), root), *SMALL_SWEEP, *CLUSTER,
                        "sweep.name=hidden"],
    }
    (d / "plan.json").write_text(json.dumps(plan))
    proc = in_namespace([sys.executable, str(TESTS / "cluster_run.py"), str(d)], cwd=TESTS, timeout_s=RUN_TIMEOUT_S)
    results = json.loads((d / "results.json").read_text())
    return {**results, "root": root, "hidden_dir": hidden, "rc": proc.returncode, "log": proc.stderr[-4000:],
            "left": processes_in(results["netns"])}


def store(cluster) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cluster['root']}/mlflow.db")


def runs(cluster, name: str) -> tuple:
    """(parent run, child runs) of one sweep."""
    client = store(cluster)
    found = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=5000)
    [parent] = [r for r in found if r.data.tags.get(ROLE_TAG) == "parent"]
    return parent, [r for r in found if r.data.tags.get(PARENT_TAG) == parent.info.run_id]


def trials(cluster, name: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    return study_trials(f"sqlite:///{cluster['root']}/optuna.db", name, SMALL_STUDIES)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_the_run_completes_and_leaves_no_process(cluster):
    assert cluster["rc"] == 0 and "resumed" in cluster, cluster["log"]
    assert cluster["left"] == []
    assert set(cluster["kills"]) == {"node2", "cluster"}  # both losses happened mid-sweep


def test_driver_without_the_token_is_told_so(cluster):
    refused = cluster["no_token"]
    [line] = error_lines(refused["stderr"])
    assert refused["rc"] == 2 and line == refused["stderr"].rstrip().splitlines()[-1]
    assert line.startswith(f"error: launcher.address={HEAD}: ") and "set RAY_AUTH_MODE=token" in line


def test_worker_without_its_checkpoints_fails_before_any_trial(cluster):
    hidden = cluster["hidden"]
    [line] = error_lines(hidden["stderr"])
    assert hidden["rc"] == 2 and line == hidden["stderr"].rstrip().splitlines()[-1] and "Traceback" not in line
    assert f"Ray node {cluster['nodes']['node2']}" in line  # the node that lacks them
    assert f"backbone.vae_ckpt={cluster['hidden_dir'] / 'vae.pt'}" in line
    parent, children = runs(cluster, "hidden")
    assert children == [] and parent.info.status == "FAILED"
    assert all(t == [] for t in trials(cluster, "hidden").values())


def test_trials_ran_on_both_nodes(cluster):
    _, children = runs(cluster, "lost")
    finished = [r for r in children if r.info.status == "FINISHED"]
    first_nodes = set(cluster["nodes"].values())
    assert {r.data.tags[NODE_TAG] for r in finished} >= first_nodes  # both nodes of the first cluster
    assert {r.data.tags[NODE_TAG] for r in finished} <= first_nodes | set(cluster["nodes_again"].values())
    assert {r.data.tags[HOST_TAG] for r in finished} == {socket.gethostname()}


def test_lost_node_trial_is_rerun_on_the_head(cluster):
    _, children = runs(cluster, "lost")
    retried = [r for r in children if int(r.data.tags.get("guidetune.retries", "0")) >= 1]
    assert retried and all(r.info.status == "FINISHED" and r.data.metrics["retries"] >= 1 for r in retried)
    assert {r.data.tags[NODE_TAG] for r in retried} == {cluster["nodes"]["head"]}
    lost_at_ms = cluster["kills"]["node2"]["at"] * 1000
    after = [r for r in children if r.info.start_time > lost_at_ms and r.data.tags.get(NODE_TAG)
             and r.info.end_time < cluster["kills"]["cluster"]["at"] * 1000]
    assert after and {r.data.tags[NODE_TAG] for r in after} == {cluster["nodes"]["head"]}


def test_cluster_loss_exits_2_with_one_line_then_the_same_command_resumes(cluster):
    lost, resumed = cluster["lost"], cluster["resumed"]
    [line] = error_lines(lost["stderr"])
    assert lost["rc"] == 2 and "Traceback" not in lost["stderr"], lost["stderr"][-3000:]
    assert line.startswith(f"error: the Ray cluster at {HEAD} is gone") and "rerun the same command" in line
    assert cluster["parent_after_loss"] == "FAILED"
    assert resumed["rc"] == 0, resumed["stderr"][-3000:]
    assert resumed["stdout"].rstrip().splitlines()[-1] == f"best: {cluster['root'] / 'sweeps' / 'lost' / 'best.yaml'}"
    parent, _ = runs(cluster, "lost")
    assert parent.info.status == "FINISHED"


def test_every_trial_completes_exactly_once(cluster):
    """Nothing is lost or run twice: one COMPLETE trial per job, one FINISHED child run per COMPLETE trial."""
    by_stage = trials(cluster, "lost")
    complete = {s: [t for t in ts if t.state == TrialState.COMPLETE] for s, ts in by_stage.items()}
    assert len(complete["proxy"]) == SMALL_TRIALS + SMALL_DESIGN
    for stage, done in complete.items():  # a search trial is its parameters; a ledger trial runs a job of its own
        keys = [json.dumps(t.params, sort_keys=True) if stage not in LEDGERS else t.user_attrs["job"] for t in done]
        assert len(keys) == len(set(keys)), stage
    interrupted = [t for ts in by_stage.values() for t in ts if t.state == TrialState.FAIL]
    assert interrupted and all(RECORD not in t.user_attrs for t in interrupted)  # only the cluster loss failed any
    _, children = runs(cluster, "lost")
    finished = [(r.data.tags[STAGE_TAG], int(r.data.tags[TRIAL_TAG])) for r in children if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted((s, t.number) for s, done in complete.items() for t in done if ran(s, t))
