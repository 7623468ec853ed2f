"""Costs of a real sweep: one proxy trial vs one FID confirmation, and the pipeline's overhead per trial.

Runs ``python -m pipeline.sweep`` end to end (local Ray, MLflow and Optuna SQLite stores under a fresh ``root``)
at the sweep defaults plus the overrides given, then reads the trials back from MLflow:

- per stage: trials, median (min-max) worker wall time per trial (``wall_s``: the actor's sampling, signals,
  FID and PNG rendering of one job, timed inside the actor);
- overhead: the driver's wall time from the first trial's start to the last trial's end, times the workers,
  minus the summed worker time; i.e. what Ray (scheduling, transfers), Optuna (ask/tell, SQLite) and MLflow
  (runs, metrics, artifacts) cost, plus any worker idle time the stage ordering forces. Reported per trial and as a
  share of the trial phase. Start-up (config, checkpoint check, FID reference, Ray and actor start) and the report
  are timed separately from the process wall clock.

    python bench/bench_costs.py --write [override ...]     # writes docs/BENCHMARKS.md "## Costs"
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from benchdoc import provenance, publish
from mlflow import MlflowClient

from pipeline.runtime.tracking import NODE_TAG

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Costs"
SWEEP_NAME = "bench-costs"


@dataclass
class Trial:
    stage: str
    num_images: int
    fid: bool
    start_s: float  # driver clock: the MLflow child run's start
    end_s: float  # driver clock: the MLflow child run's end (after its results were logged)
    wall_s: float  # worker clock: the actor's time on the job
    node: str  # the Ray node of the actor

    @property
    def pipeline_s(self) -> float:
        """Driver's time on the trial: MLflow run created (before submission) to results logged."""
        return self.end_s - self.start_s

    @property
    def extra_s(self) -> float:
        """Pipeline time minus the worker's time: Ray, Optuna and MLflow, and waiting for the driver."""
        return self.pipeline_s - self.wall_s

    @property
    def kind(self) -> str:
        return f"{self.stage} ({'FID, ' if self.fid else ''}{self.num_images} images)"


def read_trials(uri: str, experiment: str) -> tuple[list[Trial], dict[str, str]]:
    """The finished child runs of the sweep's parent run, and the parent's parameters."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"no MLflow experiment {experiment!r} in {uri}; did the sweep run?")
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    parent = next(r for r in runs if r.data.tags.get("guidetune.role") == "parent")
    trials = [
        Trial(
            stage=r.data.tags["guidetune.stage"],
            num_images=int(r.data.params["num_images"]),
            fid=r.data.params["fid"] == "True",
            start_s=r.info.start_time / 1000,
            end_s=r.info.end_time / 1000,
            wall_s=r.data.metrics["wall_s"],
            node=r.data.tags.get(NODE_TAG, ""),
        )
        for r in runs
        if r.data.tags.get("guidetune.role") == "trial" and r.info.status == "FINISHED"
    ]
    return trials, parent.data.params


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to the sweep (e.g. backbone.var_ckpt=...)")
    p.add_argument("--root", type=Path, default=None, help="sweep root, kept (default: a temporary folder, removed)")
    p.add_argument("--write", action="store_true", help="write the ## Costs section of docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    command = "python bench/bench_costs.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    root = args.root
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="guidetune-costs-"))
        atexit.register(shutil.rmtree, root, True)
    sweep = [sys.executable, "-m", "pipeline.sweep", f"root={root}", f"sweep.name={SWEEP_NAME}", *args.overrides]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    load_before = os.getloadavg()[0]
    started = time.time()
    proc = subprocess.run(sweep, cwd=ROOT, env=env, capture_output=True, text=True)
    finished = time.time()
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"the sweep exited with {proc.returncode}: {shlex.join(sweep)}")
    best_line = proc.stdout.strip().splitlines()[-1]

    trials, params = read_trials(f"sqlite:///{root}/mlflow.db", SWEEP_NAME)
    workers = int(params["launcher.workers"])
    first, last = min(t.start_s for t in trials), max(t.end_s for t in trials)
    phase_s = last - first
    work_s = sum(t.wall_s for t in trials)
    overhead_s = workers * phase_s - work_s
    kinds: dict[str, list[Trial]] = {}
    for t in sorted(trials, key=lambda t: (t.fid, t.num_images, t.stage)):
        kinds.setdefault(t.kind, []).append(t)
    proxy_s = statistics.median(t.wall_s for t in trials if t.stage == "proxy")
    rows = [
        f"| {kind} | {len(ts)} | {spread([t.wall_s for t in ts])} | "
        f"{statistics.median(t.wall_s for t in ts) / proxy_s:.1f}x | {spread([t.extra_s for t in ts])} | "
        f"{statistics.median(t.extra_s / t.pipeline_s for t in ts):.1%} |"
        for kind, ts in kinds.items()
    ]
    extra_share = sum(t.extra_s for t in trials) / sum(t.pipeline_s for t in trials)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{load_before:.1f} before, {load_after:.1f} after), torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; {date}.  ",
        f"Sweep: `{shlex.join(sweep[1:])}` (sweep defaults otherwise: {workers} Ray actors with "
        f"{params['launcher.cpus_per_worker']} CPU each, {params['search.n_trials']} proxy trials of "
        f"{params['proxy.num_images']} images, {params['refine.n_trials']} FID refinement trials per kind of "
        f"{params['refine.num_images']} images, a race at {params['confirm.rungs']} images; VAR "
        f"`{provenance(params['backbone.var_ckpt'])}`); it printed `{best_line}`.",
        "",
        "Worker time per trial: inside the actor (sampling, signals, FID, PNG rendering), median (min-max). "
        "Overhead per trial: the pipeline's time on the trial (its MLflow child run, created before the job is "
        "submitted and closed after its results are logged) minus the worker time, i.e. Ray submission and "
        "transfer, Optuna ask/tell and user attributes, MLflow runs, metrics and artifacts, and any wait for the "
        "driver (proxy results are told in ask order); share = overhead / pipeline time, median per trial.",
        "",
        "| trial kind | trials | worker s / trial | vs proxy trial | overhead s / trial | overhead share |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"All {len(trials)} trials: overhead {extra_share:.1%} of their summed pipeline time. Worker capacity "
        f"over the trial phase (first trial start to last trial end, {phase_s:.1f} s x {workers} workers) minus "
        f"worker time = {overhead_s:.1f} s ({overhead_s / (workers * phase_s):.1%}); beyond the per-trial overhead "
        "this counts workers idle at stage barriers (a stage or a race rung waits for its slowest job).",
        "",
        f"Whole process: {finished - started:.1f} s; before the first trial (config, checkpoint check, FID reference "
        f"statistics, Ray and actor start) {first - started:.1f} s; after the last trial (report, plots, MLflow "
        f"summary, Ray shutdown) {finished - last:.1f} s.",
    ])
    publish(body, SECTION, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
