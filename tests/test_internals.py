"""Each private library internal of pipeline/runtime/internals.py against the installed library: a failure here names
the internal an upgrade moved or changed, before a sweep meets it."""

from __future__ import annotations

import inspect
from pathlib import Path

import ray
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from ray._private import ray_constants

from pipeline.config.schema import CONF_DIR
from pipeline.runtime.internals import (
    hydra_args_parser,
    hydra_jobs,
    mlflow_source_tags,
    ray_node_address,
    ray_single_node,
)


def test_hydra_args_parser_is_hydras_command_line():
    args = hydra_args_parser().parse_args(["-m", "--cfg", "job", "seed=1", "backbone=tiny,tiny_small"])
    assert args.multirun and args.cfg == "job" and args.overrides == ["seed=1", "backbone=tiny,tiny_small"]
    assert {"config_path", "config_name", "config_dir", "experimental_rerun", "shell_completion", "info"} <= set(
        vars(args))  # the flags pipeline.runtime.app refuses or counts


def test_hydra_jobs_expand_sweeps_as_the_basic_sweeper():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(CONF_DIR)), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = parser.parse_overrides(["seed=range(0,2)", "guidance=cfg,igg", "root=/tmp/x"])
        jobs = hydra_jobs(overrides)
    assert sorted(map(tuple, jobs)) == sorted((f"seed={s}", f"guidance={g}", "root=/tmp/x")
                                              for s in (0, 1) for g in ("cfg", "igg"))


def test_ray_single_node_switch_is_set_inside_and_restored():
    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_single_node():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert before == ray_constants.ENABLE_RAY_CLUSTER


def test_ray_init_takes_the_node_address_argument():
    """A private keyword of ray.init (it refuses unknown ones): tests/test_distributed.py starts a Ray with it."""
    [(name, value)] = ray_node_address("127.0.0.1").items()
    assert f'kwargs.pop("{name}"' in inspect.getsource(ray.init) and value == "127.0.0.1"


def test_mlflow_source_tags_are_the_fluent_run_tags():
    tags = mlflow_source_tags()
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(tags)
