"""The private library internals guidetune relies on, each behind one small function here and nowhere else.

Each is a real need that the library's public API does not meet; each has a test (tests/test_internals.py) that
fails loudly, naming the internal, when an upgrade moves or changes it.

- Hydra: its own command-line parser (``hydra._internal.utils.get_args_parser``), so the checks before Hydra parse
  exactly what Hydra will; its basic sweeper's expansion of ``-m`` overrides (``BasicSweeper.split_arguments``), so
  the jobs checked are the jobs Hydra launches.
- Ray: the single-node switch (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``), so a local Ray listens on loopback
  only; and ``ray.init(_node_ip_address=...)``, the address the local node announces.
- MLflow: the tags its fluent ``start_run`` sets (``mlflow.tracking.context.registry.resolve_tags``: user, source,
  git commit), which runs made through ``MlflowClient`` do not get by themselves.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.types import Override
from mlflow.tracking.context.registry import resolve_tags
from ray._private import ray_constants


def hydra_args_parser() -> argparse.ArgumentParser:
    """Hydra's own parser of its flags and overrides."""
    return get_args_parser()


def hydra_jobs(overrides: Sequence[Override]) -> list[list[str]]:
    """The jobs of ``-m``: one list of overrides per point of the sweeps' product, as Hydra's basic sweeper makes
    them. Raises HydraException for a sweep it cannot expand."""
    [jobs] = BasicSweeper.split_arguments(list(overrides), max_batch_size=None)
    return jobs


@contextmanager
def ray_single_node() -> Iterator[None]:
    """Ray's multi-node switch off inside the block (a local Ray then binds loopback only), restored after."""
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def ray_node_address(ip: str) -> dict[str, Any]:
    """``ray.init`` keyword arguments that make a local node announce `ip`."""
    return {"_node_ip_address": ip}


def mlflow_source_tags() -> dict[str, str]:
    """What MLflow's fluent ``start_run`` tags a run with: user, source name and type, git commit of the source."""
    return resolve_tags({})
