"""Hydra callbacks of the sweep application (conf/sweep.yaml, ``hydra.callbacks``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.config.schema import ConfigError
from pipeline.outputs.summary import build, multirun_jobs


class SummaryCallback(Callback):
    """After the jobs of ``-m``: summary.yaml, summary.md and summary.png in hydra.sweep.dir, one MLflow run in the
    guidetune-summaries experiment of tracking.uri, and ``summary: <path to summary.yaml>`` as the last line.

    The jobs are read back from the folder (each job's .hydra/), as ``python -m pipeline.outputs.summary <folder>``
    reads them, so the summary does not depend on the Hydra launcher that ran them.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        try:
            path = build(multirun_jobs(folder), folder, str(config.tracking.uri))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"summary: {path}")
