"""What a person sees in the MLflow UI of a sweep: its store served on loopback, pages shot in headless Chromium.

    python bench/ui_screenshot.py --store mlruns/mlflow.db --sweep tiny-auto --out docs/mlflow_ui

writes ``<out>_runs.png`` (the experiment as it opens: the runs table, the sweep's parent with its trials folded
under it), ``<out>_parent.png`` (the parent run: source, git commit, child runs, tags) and ``<out>_artifacts.png``
(its artifacts: best.yaml, config.yaml, the race table, the report). Needs ``chromium`` (``apt-get install chromium``).
The server listens on 127.0.0.1 only and is stopped (with every process it started) at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

from pipeline.runtime.tracking import ROLE_TAG, SWEEP_TAG

LOOPBACK = "127.0.0.1"
TRAINING = "workflowType=machine_learning"  # the UI's "Model training" view (its default is GenAI)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def screenshot(chromium: str, url: str, out: Path, budget_ms: int) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{out}: {url}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="the sweep's MLflow SQLite file")
    p.add_argument("--sweep", required=True, help="sweep.name (the experiment)")
    p.add_argument("--out", type=Path, required=True, help="PNG path prefix")
    p.add_argument("--budget-ms", type=int, default=20000, help="virtual time Chromium gives each page to render")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        p.error("chromium is not installed; apt-get install chromium")
    uri = f"sqlite:///{args.store.resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(args.sweep)
    if experiment is None:
        p.error(f"{args.store} has no experiment {args.sweep!r}")
    [parent] = client.search_runs([experiment.experiment_id],
                                  f"tags.`{ROLE_TAG}` = 'parent' and tags.`{SWEEP_TAG}` = '{args.sweep}'")
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
         "--backend-store-uri", uri],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://{LOOPBACK}:{port}"
        wait_for(f"{base}/health", 120)
        exp, run = experiment.experiment_id, parent.info.run_id
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(chromium, f"{base}/#/experiments/{exp}?{TRAINING}", args.out.with_name(f"{args.out.name}_runs.png"),
                   args.budget_ms)
        screenshot(chromium, f"{base}/#/experiments/{exp}/runs/{run}?{TRAINING}", args.out.with_name(
            f"{args.out.name}_parent.png"), args.budget_ms)
        screenshot(chromium, f"{base}/#/experiments/{exp}/runs/{run}/artifacts?{TRAINING}",
                   args.out.with_name(f"{args.out.name}_artifacts.png"), args.budget_ms)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
