"""MLflow tracking on a real SQLite store: parent/child runs, metrics, per-scale steps, images, resume, REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.core.render import sample_grid_png
from pipeline.runtime.tracking import (
    CONFIG_ARTIFACT,
    HOST_TAG,
    KIND_TAG,
    MODEL_DEVELOPMENT,
    NODE_TAG,
    PARENT_TAG,
    STAGE_TAG,
    Tracker,
    artifact_root,
    flatten,
)
from tuners.jobs import Done, Evaluation, Job
from tuners.space import Candidate

SIGNALS = ("vocab_evenness", "div_uncond")
PER_SCALE = {"vocab_evenness": [1.0, 0.8, 0.6], "div_uncond": [0.0, 0.1, 0.3], "token_evenness": [1.0, 0.9, 0.9],
             "div_cond": [0.0, 0.05, 0.1]}


FID_METRICS = {"fid": 12.5, "fid_low": 11.0, "fid_high": 14.0, "isc": 1.5, "kid": 0.01, "precision": 0.5,
               "recall": 0.25}


def evaluation() -> Evaluation:
    grid = sample_grid_png(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), nrow=2)
    return Evaluation(
        signals={k: sum(v[1:]) / 2 for k, v in PER_SCALE.items()},
        per_scale=PER_SCALE,
        num_images=8,
        wall_s=2.0,
        images={"samples.png": grid, "guidance.png": grid[::-1]},
        node_id="ab" * 28,
        hostname="node-a",
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating one takes seconds); each test uses its own experiment."""
    return tmp_path_factory.mktemp("tracking") / "store"


def uri(folder: Path) -> str:
    return f"sqlite:///{folder}/mlflow.db"


JOB = Job(Candidate(2.0, 1.0, 3), num_images=8, seed=0)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": None, "e": [1, 2]}


def test_store_created_with_artifacts_beside_it(store):
    tracker = Tracker(uri(store), "created", SIGNALS)
    assert (store / "mlflow.db").is_file()
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.name == "created" and exp.artifact_location == (store / "artifacts").as_uri()
    assert exp.tags[KIND_TAG] == MODEL_DEVELOPMENT  # the UI opens it on the runs table, not on GenAI traces
    assert artifact_root("http://127.0.0.1:5000") is None
    client = MlflowClient(tracking_uri=uri(store))  # an experiment made before the tag existed gets it on reopen
    old = client.create_experiment("untagged")
    assert KIND_TAG not in client.get_experiment(old).tags
    Tracker(uri(store), "untagged", SIGNALS)
    assert client.get_experiment(old).tags[KIND_TAG] == MODEL_DEVELOPMENT


def test_parent_child_metrics_steps_and_images(store, tmp_path):
    tracker = Tracker(uri(store), "children", SIGNALS)
    config = {"search": {"n_trials": 4, "windows": [None, 3]}, "seed": 0}
    parent = tracker.open_parent(config)
    assert tracker.client.get_run(parent).data.params == {"search.n_trials": "4", "search.windows": "[None, 3]",
                                                          "seed": "0"}
    logged = Path(tracker.client.download_artifacts(parent, CONFIG_ARTIFACT, str(tmp_path / "cfg")))
    assert yaml.safe_load(logged.read_text()) == config  # the composed config, one YAML artifact
    tracker.started("proxy", 0, JOB)
    ev = evaluation()
    tracker.finished("proxy", 0, JOB, Done(0, ev, None, retries=1), {"E": 0.7, "D": 0.2, "gap": 0.5})
    [child] = tracker.children()
    run = tracker.client.get_run(child.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags[STAGE_TAG] == "proxy"
    for tags in (run.data.tags, tracker.client.get_run(parent).data.tags):  # the UI's Source and User columns
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
    assert (run.data.tags[NODE_TAG], run.data.tags[HOST_TAG]) == (ev.node_id, ev.hostname)
    assert run.data.params == {"w_cfg": "2.0", "w_igg": "1.0", "window": "3", "kind": "mixed", "num_images": "8",
                               "start": "0", "seed": "0", "fid": "False"}
    m = run.data.metrics
    assert (m["E"], m["D"], m["gap"], m["retries"]) == (0.7, 0.2, 0.5, 1.0)
    assert m["images_per_s"] == pytest.approx(4.0) and m["wall_s"] == 2.0
    assert m["vocab_evenness"] == pytest.approx(0.7)
    for name, alias in (("vocab_evenness", "E"), ("div_uncond", "D"), ("div_cond", None)):
        for key in [f"scale.{name}"] + ([f"scale.{alias}"] if alias else []):
            history = tracker.client.get_metric_history(run.info.run_id, key)
            history = sorted(history, key=lambda h: h.step)
            assert [h.step for h in history] == list(range(len(PER_SCALE[name])))
            assert [h.value for h in history] == pytest.approx(PER_SCALE[name])
    local = Path(tracker.client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert (local / "samples.png").read_bytes() == ev.images["samples.png"]
    assert (local / "guidance.png").read_bytes() == ev.images["guidance.png"]


def test_fid_metrics_and_failed_runs(store):
    tracker = Tracker(uri(store), "failed", SIGNALS)
    tracker.open_parent({})
    fid_job = Job(Candidate(1.5, None, None), 64, 0, fid=True)
    tracker.started("confirm", 0, fid_job)
    tracker.finished("confirm", 0, fid_job, Done(0, evaluation(), None, 0), FID_METRICS)
    tracker.started("proxy", 1, JOB)
    tracker.failed("proxy", 1, JOB, "non-finite vocab_evenness at w=1e9", retries=2)
    runs = {r.data.tags[STAGE_TAG]: r for r in tracker.children()}
    assert runs["confirm"].data.metrics["fid"] == 12.5 and runs["confirm"].data.metrics["recall"] == 0.25
    assert runs["confirm"].info.run_name == "confirm 0 · w=1.50" and runs["confirm"].data.params["kind"] == "cfg"
    assert runs["proxy"].info.status == "FAILED"
    assert runs["proxy"].data.tags["guidetune.fail_reason"] == "non-finite vocab_evenness at w=1e9"
    assert runs["proxy"].data.tags["guidetune.retries"] == "2"


def test_resume_reopens_parent_and_kills_stale_children(store):
    first = Tracker(uri(store), "resumed", SIGNALS)
    parent = first.open_parent({"seed": 0})
    first.started("proxy", 0, JOB)  # the driver dies here
    first.close("FAILED")
    again = Tracker(uri(store), "resumed", SIGNALS)
    assert again.open_parent({"seed": 0}) == parent
    assert again.client.get_run(parent).info.status == "RUNNING"
    [child] = again.children()
    assert child.info.status == "KILLED" and child.data.tags["guidetune.fail_reason"].startswith("driver died")
    other = Tracker(uri(store), "other", SIGNALS)
    assert other.open_parent({}) != parent and other.children() == []


def test_summary_on_parent(store, tmp_path):
    tracker = Tracker(uri(store), "summary", SIGNALS)
    parent = tracker.open_parent({})
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    table = {"candidate": ["w=3.00", "w=1.50"], "num_images": [64, 64], "fid": [3.0, 4.5]}
    tracker.log_summary({"best_fid": 3.0, "spearman_rho": float("nan")}, {"guidetune.best": "w=3.00"}, [report],
                        {"race.json": table})
    tracker.close()
    run = tracker.client.get_run(parent)
    assert run.data.metrics == {"best_fid": 3.0}  # a NaN rho is left out, not logged
    assert run.data.tags["guidetune.best"] == "w=3.00" and run.info.status == "FINISHED"
    assert [a.path for a in tracker.client.list_artifacts(parent)] == [CONFIG_ARTIFACT, "race.json", "report.md"]
    assert {"path": "race.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    split = json.loads(Path(tracker.client.download_artifacts(parent, "race.json", str(tmp_path / "t"))).read_text())
    assert {c: [row[i] for row in split["data"]] for i, c in enumerate(split["columns"])} == table
    tracker.log_summary({}, {}, [], {"race.json": table})  # a rerun of the finished sweep: the table is not doubled
    again = json.loads(Path(tracker.client.download_artifacts(parent, "race.json", str(tmp_path / "u"))).read_text())
    assert again == split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server and every process it started (uvicorn, job consumers); SIGKILL what outlives the grace."""
    os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace_s)


def test_mlflow_ui_on_localhost_lists_runs_over_rest(store):
    tracker = Tracker(uri(store), "served", SIGNALS)
    parent = tracker.open_parent({})
    tracker.started("proxy", 0, JOB)
    tracker.finished("proxy", 0, JOB, Done(0, evaluation(), None, 0), {"gap": 0.5})
    tracker.close()
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", uri(store)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
                time.sleep(1)
        body = json.dumps({"experiment_ids": [tracker.experiment_id]}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
        ids = {r["info"]["run_id"] for r in runs}
        assert parent in ids and len(ids) == 2
        child = next(r for r in runs if r["info"]["run_id"] != parent)
        assert {m["key"]: m["value"] for m in child["data"]["metrics"]}["gap"] == 0.5
    finally:
        stop_process_group(server)
    assert MlflowClient(uri(store)).get_run(parent).info.status == "FINISHED"


OPEN_STORES = """
import sys
from pipeline.runtime.tracking import Tracker
from tuners.studies import open_study
root, name = sys.argv[1], sys.argv[2]
Tracker(f"sqlite:///{root}/mlflow.db", name, ("vocab_evenness", "div_uncond")).open_parent({})
open_study(f"sqlite:///{root}/optuna.db", name + "/proxy")
"""


def test_two_drivers_create_fresh_stores_at_once(tmp_path):
    """Concurrent sweeps with different names on the same (fresh) stores: both create them without crashing."""
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORES, str(tmp_path), name], stderr=subprocess.PIPE,
                              text=True) for name in ("one", "two")]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    client = MlflowClient(uri(tmp_path))
    assert {e.name for e in client.search_experiments()} >= {"one", "two"}
    assert {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/optuna.db")} == {
        "one/proxy", "two/proxy"}
