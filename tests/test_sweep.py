"""End to end: `python -m pipeline.sweep` on a real (micro, random) VAR, real local Ray, temporary MLflow/Optuna
stores. One sweep; the tests read what it left behind."""

from __future__ import annotations

import contextlib
import io
import math

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_fixtures import PATCH_NUMS, micro_overrides, write_micro_backbone

from pipeline.report import BEST_KEYS, read_best
from pipeline.sweep import main
from pipeline.tracking import ROLE_TAG, STAGE_TAG
from tuners.studies import study_name

N_TRIALS, TOP_K, CALIBRATION = 6, 2, 3
SETTINGS = [
    "sweep.name=e2e", f"search.n_trials={N_TRIALS}", "search.n_startup_trials=3", "proxy.num_images=4",
    "proxy.batch_size=4", "proxy.calibration=[0,0.5,1]", f"confirm.top_k={TOP_K}", "confirm.small_num_images=20",
    "confirm.num_images=24", "confirm.full_top=1", "confirm.reference_num_images=40", "confirm.batch_size=24",
    "launcher.workers=2", "sweep.grid_images=4", "sweep.grid_nrow=2", "sweep.heatmap_images=2",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    root = d / "root"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main([*micro_overrides(write_micro_backbone(d / "ckpt"), root), *SETTINGS])
    return {"rc": rc, "lines": stdout.getvalue().splitlines(), "root": root}


def test_exit_code_and_last_line_names_best_yaml(sweep):
    assert sweep["rc"] == 0
    last = sweep["lines"][-1]
    assert last == f"best: {sweep['root'] / 'sweeps' / 'e2e' / 'best.yaml'}"


def test_best_yaml_and_report(sweep):
    out = sweep["root"] / "sweeps" / "e2e"
    data = yaml.safe_load((out / "best.yaml").read_text())
    assert list(data) == list(BEST_KEYS)
    best = read_best(out / "best.yaml")
    assert (best.backbone, best.guidance) == ("tiny", "mixed")
    assert math.isfinite(best.fid) and best.fid >= 0 and math.isfinite(best.gap)
    assert best.w_cfg is not None
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| w=")]
    assert len(rows) == TOP_K + 2  # proxy candidates + published default + unguided
    assert {"default", "unguided"} <= {row.split("|")[2].strip() for row in rows}
    assert (out / "gap_vs_fid.png").stat().st_size > 0 and (out / "proxy_signals.png").stat().st_size > 0


def test_optuna_studies(sweep):
    storage = f"sqlite:///{sweep['root']}/optuna.db"
    proxy = optuna.load_study(study_name=study_name("e2e", "proxy"), storage=storage)
    assert len(proxy.get_trials(states=(TrialState.COMPLETE,))) == N_TRIALS
    ranges = proxy.user_attrs["ranges"]
    assert ranges["div_uncond"][0] < ranges["div_uncond"][1]
    calibration = optuna.load_study(study_name=study_name("e2e", "calibration"), storage=storage)
    assert len(calibration.trials) == CALIBRATION + 2  # design points + the two baselines
    confirm = optuna.load_study(study_name=study_name("e2e", "confirm"), storage=storage)
    sizes = sorted(t.user_attrs["job"]["num_images"] for t in confirm.get_trials(states=(TrialState.COMPLETE,)))
    assert sizes == [20] * (TOP_K + 2) + [24] * 2  # small N for all, full N for the best and unguided


def test_mlflow_parent_and_one_child_per_trial(sweep, tmp_path):
    client = MlflowClient(f"sqlite:///{sweep['root']}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get(ROLE_TAG) == "parent"]
    assert parent.info.status == "FINISHED"
    assert {"best_fid", "best_w_cfg", "best_gap"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "best.yaml", "report.md", "gap_vs_fid.png", "proxy_signals.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = [r.data.tags[STAGE_TAG] for r in children]
    assert (stages.count("calibration"), stages.count("proxy"), stages.count("confirm")) == (
        CALIBRATION + 2, N_TRIALS, TOP_K + 2 + 2)
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"vocab_evenness", "div_uncond", "wall_s", "images_per_s"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"samples.png", "guidance.png"}
        stage = run.data.tags[STAGE_TAG]
        if stage == "proxy":
            assert {"E", "D", "gap", "gap_tokens_cond"} <= set(run.data.metrics)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "scale.E")]
            assert sorted(steps) == list(range(len(PATCH_NUMS)))
        if stage == "confirm":
            assert {"fid", "isc", "kid", "precision", "recall"} <= set(run.data.metrics)
