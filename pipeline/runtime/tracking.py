"""MLflow side of a sweep (driver only): one parent run per sweep, one child run per trial.

The store (SQLite under mlruns/ by default) and the experiment are created here, in the driver, before any worker
starts. A rerun with the same sweep name reopens the parent run; child runs of trials a dead driver did not finish
in Optuna (left RUNNING, or logged just before the driver died) are marked KILLED first. Workers never talk to
MLflow: they return numbers and PNG bytes and the driver logs them.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from pipeline.data.files import sqlite_path, store_lock
from pipeline.runtime.internals import mlflow_source_tags
from tuners.jobs import Done, Job

SWEEP_TAG = "guidetune.sweep"
ROLE_TAG = "guidetune.role"
STAGE_TAG = "guidetune.stage"
TRIAL_TAG = "guidetune.trial"
NODE_TAG = "guidetune.node_id"  # the Ray node of the worker that evaluated a trial
HOST_TAG = "guidetune.hostname"  # and its host
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "mlflow.experimentKind"  # the UI opens an experiment of this kind on its runs table
MODEL_DEVELOPMENT = "custom_model_development"
CONFIG_ARTIFACT = "config.yaml"  # the composed configuration, on the parent run
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


def _now_ms() -> int:
    return int(time.time() * 1000)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def artifact_root(uri: str) -> str | None:
    """Artifacts next to a SQLite store (``<db folder>/artifacts``); None lets other stores choose."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent.resolve() / "artifacts").as_uri()


class Tracker:
    """The sweep's MLflow experiment and runs. Implements tuners.jobs.Observer for the stages.

    Args:
        uri: MLflow tracking URI; a SQLite file is created (with its folder) if missing, one process at a time.
        experiment: experiment name (the sweep name).
        signal_names: (evenness, divergence) signal names the proxy uses, logged per scale as E and D too.
    """

    def __init__(self, uri: str, experiment: str, signal_names: tuple[str, str]):
        self.experiment = experiment
        self.signal_names = signal_names
        with store_lock(uri):  # the client creates a fresh SQLite store; concurrent creators would crash
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_root(uri),
                                                   tags={KIND_TAG: MODEL_DEVELOPMENT})
            )
            if found is not None and found.tags.get(KIND_TAG) != MODEL_DEVELOPMENT:
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, MODEL_DEVELOPMENT)
        # what MLflow's fluent start_run sets: user, source name and type, git commit of the source
        self.source_tags: dict[str, str] = mlflow_source_tags()
        self.parent_id = ""
        self.runs: dict[tuple[str, int], str] = {}

    # ------------------------------------------------------------------------------------------- parent

    def open_parent(self, params: Mapping[str, Any], kept: Collection[tuple[str, int]] | None = None) -> str:
        """Create the sweep's parent run, or reopen it (resume) and mark the stale child runs KILLED.

        Args:
            params: the sweep configuration, logged on a new parent run.
            kept: (stage, trial number) of every trial the studies hold as finished; the child runs of all other
                trials are stale. None: only child runs left RUNNING are stale.
        """
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{ROLE_TAG}` = 'parent' and tags.`{SWEEP_TAG}` = '{self.experiment}'"
        )
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            self._kill_stale_children(kept)
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.experiment,
                tags={**self.source_tags, ROLE_TAG: "parent", SWEEP_TAG: self.experiment},
            )
            self.parent_id = run.info.run_id
            self.client.log_batch(
                self.parent_id,
                params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()],
            )
            self.client.log_text(self.parent_id, yaml.safe_dump(dict(params), sort_keys=False), CONFIG_ARTIFACT)
        return self.parent_id

    def children(self) -> list:
        """Every child run of the parent (any status)."""
        return list(
            self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_id}'", max_results=5000)
        )

    def _kill_stale_children(self, kept: Collection[tuple[str, int]] | None) -> None:
        killed = RunStatus.to_string(RunStatus.KILLED)
        for run in self.children():
            trial = (run.data.tags.get(STAGE_TAG), int(run.data.tags.get(TRIAL_TAG, -1)))
            unfinished = kept is not None and trial not in kept
            if run.info.status == "RUNNING" or (unfinished and run.info.status != killed):
                self.client.set_tag(run.info.run_id, "guidetune.fail_reason", "driver died during the trial")
                self.client.set_terminated(run.info.run_id, status=killed)

    def close(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def log_summary(
        self, metrics: Mapping[str, float], tags: Mapping[str, str], files: list[Path],
        tables: Mapping[str, Mapping[str, list]] | None = None,
    ) -> None:
        """Best parameters, FID, margin and costs, the report files, and tables (artifact file -> columns, shown by
        the UI's artifact view and ``mlflow.load_table``) on the parent run."""
        now = _now_ms()
        self.client.log_batch(
            self.parent_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        for path in files:
            self.client.log_artifact(self.parent_id, str(path))
        logged = {a.path for a in self.client.list_artifacts(self.parent_id)}
        for name, columns in (tables or {}).items():
            if name not in logged:  # log_table appends to a table of that name: a resumed sweep would double it
                self.client.log_table(self.parent_id, data=dict(columns), artifact_file=name)

    # --------------------------------------------------------------------------- Observer (children)

    def started(self, stage: str, number: int, job: Job) -> None:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{stage} {number} · {job.candidate.label()}",
            tags={**self.source_tags, PARENT_TAG: self.parent_id, SWEEP_TAG: self.experiment, STAGE_TAG: stage,
                  TRIAL_TAG: str(number), ROLE_TAG: "trial"},
        )
        self.runs[(stage, number)] = run.info.run_id
        params = {**job.candidate.as_dict(), "kind": job.candidate.kind, "num_images": job.num_images,
                  "start": job.start, "seed": job.seed, "fid": job.fid}
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def finished(self, stage: str, number: int, job: Job, done: Done, metrics: dict[str, float]) -> None:
        run_id = self.runs.pop((stage, number))
        evaluation = done.evaluation
        assert evaluation is not None
        now = _now_ms()
        values = {
            **evaluation.signals,
            **metrics,
            "wall_s": evaluation.wall_s,
            "images_per_s": evaluation.images_per_s,
            "retries": float(done.retries),
        }
        logged = [Metric(k, float(v), now, 0) for k, v in values.items() if math.isfinite(v)]
        e_name, d_name = self.signal_names
        for name, per_scale in evaluation.per_scale.items():
            aliases = ["E"] if name == e_name else ["D"] if name == d_name else []
            for alias in [f"scale.{name}", *(f"scale.{a}" for a in aliases)]:
                logged += [Metric(alias, float(v), now, k) for k, v in enumerate(per_scale) if math.isfinite(v)]
        tags = {"guidetune.retries": str(done.retries), NODE_TAG: evaluation.node_id, HOST_TAG: evaluation.hostname}
        self.client.log_batch(run_id, metrics=logged, tags=[RunTag(k, v) for k, v in tags.items() if v])
        with tempfile.TemporaryDirectory() as tmp:
            for name, png in evaluation.images.items():
                path = Path(tmp) / name
                path.write_bytes(png)
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status="FINISHED")

    def failed(self, stage: str, number: int, job: Job, reason: str, retries: int) -> None:
        run_id = self.runs.pop((stage, number))
        self.client.log_batch(
            run_id,
            tags=[RunTag("guidetune.fail_reason", reason[:5000]), RunTag("guidetune.retries", str(retries))],
        )
        self.client.set_terminated(run_id, status="FAILED")
