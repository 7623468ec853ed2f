"""End to end: `python -m pipeline.sweep` on a real (micro, random) VAR, real local Ray, temporary MLflow/Optuna
stores. One sweep over every guidance kind; the tests read what it left behind."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_fixtures import PATCH_NUMS, micro_overrides, write_micro_backbone

from pipeline import generate
from pipeline.backbones.var import load_var
from pipeline.fid.fidelity import FidEvaluator
from pipeline.outputs.best import BEST_KEYS, read_best
from pipeline.runtime.tracking import ROLE_TAG, STAGE_TAG
from pipeline.sweep import main
from tuners.scoring import FeatureBank
from tuners.space import Candidate
from tuners.studies import record_of, study_name

N_TRIALS, DESIGN, POINTS, REFINE, FINALISTS = 6, 2, 3, 2, 3
KINDS = ("cfg", "igg", "mixed")
SETTINGS = [
    "sweep.name=e2e", f"search.n_trials={N_TRIALS}", "search.n_startup_trials=3", "search.max_grows=1",
    "proxy.num_images=4", "proxy.batch_size=4", "proxy.design=[0.5,1]", f"refine.n_trials={REFINE}",
    "refine.num_images=24", f"screen.points={POINTS}", "screen.rungs=[24]", f"confirm.finalists={FINALISTS}",
    "confirm.rungs=[48,72]", "confirm.bootstrap=20",
    "confirm.reference_num_images=40", "confirm.batch_size=24", "launcher.workers=2", "sweep.grid_images=4",
    "sweep.grid_nrow=2", "sweep.heatmap_images=2",
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
    assert (best.backbone, best.guidance) == ("tiny", "auto") and best.kind in KINDS
    assert best.fid_low <= best.fid <= best.fid_high
    # the last rung decides, on the images it added (48..71), which no stage saw before; a rung that left one
    # finalist (every other one worse beyond noise) sends it straight there, its runner-up separated at that N
    assert (best.holdout_from, best.num_images) == (48, 24)
    assert (best.margin.start, best.margin.num_images) == (48, 24) or (
        best.margin.separated and (best.margin.start, best.margin.num_images) == (0, 48))
    assert set(best.at_bound) == {w for w in ("w_cfg", "w_igg") if getattr(best, w) is not None}
    assert set(best.at_bound.values()) <= {"inside", "low", "cap"}
    assert best.margin is None or best.margin.low <= best.margin.diff <= best.margin.high
    assert best.default.w_cfg == 1.5 and best.default.num_images in (48, 72)
    assert set(best.cost) == {"proxy", "screen", "refine", "confirm", "total"}
    regions = sum(b.refined for b in best.basins)
    assert 1 <= regions <= 3 and best.basins[0].refined and best.basins[0].worse is None
    assert best.cost["refine"].trials == REFINE * regions and best.cost["refine"].images == 24 * REFINE * regions
    assert best.cost["screen"].images >= 24 * POINTS * len(KINDS)  # every kind over the range (+ the proxy's picks)
    assert best.cost["total"].images == sum(best.cost[s].images for s in ("proxy", "screen", "refine",
                                                                                 "confirm"))
    assert best.proxy_rho.low <= best.proxy_rho.value <= best.proxy_rho.high
    assert best.proxy_rho.n >= POINTS * len(KINDS)
    assert best.versus.low <= best.versus.diff <= best.versus.high and "CFG" in best.versus.verdict
    assert len(best.checkpoints["var_ckpt"].sha256) == 64
    report = (out / "report.md").read_text()
    assert "separated" in report and "| stage | trials | images sampled | worker s |" in report
    assert f"FID {best.fid:.3f} [{best.fid_low:.3f}, {best.fid_high:.3f}] on its 24 hold-out images (48..71" in report
    assert "| hold-out FID (48..71) |" in report
    rows = [line for line in report.splitlines() if line.startswith("| w") and "|" in line[2:]]
    assert len(rows) >= 2  # finalists (and the default)
    assert all((out / f"proxy_signals_{k}.png").stat().st_size > 0 for k in KINDS)
    assert "## The whole range (screen)" in report and "ρ(gap, FID)" in report and "| igg global |" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optuna_studies(sweep):
    storage = f"sqlite:///{sweep['root']}/optuna.db"
    proxy = optuna.load_study(study_name=study_name("e2e", "proxy"), storage=storage)
    budget = proxy.user_attrs["state"]["budget"]
    assert len(proxy.get_trials(states=(TrialState.COMPLETE,))) == budget >= N_TRIALS + DESIGN * len(KINDS)
    assert {t.params["kind"] for t in proxy.trials} == set(KINDS)
    screen = optuna.load_study(study_name=study_name("e2e", "screen"), storage=storage)
    records = [record_of(t) for t in screen.get_trials(states=(TrialState.COMPLETE,))]
    assert {r.kind for r in records} == set(KINDS) and all(r.num_images == 24 and r.start == 0 for r in records)
    lowest = min(min(r.candidate[w] or math.inf for w in ("w_cfg", "w_igg")) for r in records if r.kind != "mixed")
    assert lowest == 0.25
    assert max(max(r.candidate[w] or 0 for w in ("w_cfg", "w_igg")) for r in records) == 30.0  # the whole range
    names = [n for n in optuna.get_all_study_names(storage) if n.startswith(study_name("e2e", "refine/"))]
    assert names and all(n.split("/")[-1].split("-")[0] in KINDS for n in names)
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
        asked = [t for t in trials if record_of(t).stage == "refine"]
        assert len(asked) == REFINE and all(record_of(t).kind == name.split("/")[-1].split("-")[0] for t in trials)
        assert all(record_of(t).num_images == 24 and record_of(t).features for t in trials)
    confirm = optuna.load_study(study_name=study_name("e2e", "confirm"), storage=storage)
    records = [record_of(t) for t in confirm.get_trials(states=(TrialState.COMPLETE,))]
    firsts = [r for r in records if r.num_images == 48]
    assert len(firsts) >= FINALISTS  # every finalist (and the default) at the first rung
    assert all(r.start == 24 for r in firsts if r.candidate["w_cfg"] != 1.5 or r.kind != "cfg")  # refined: extended
    assert all(r.start == 48 for r in records if r.num_images == 72)


def test_mlflow_parent_and_one_child_per_trial(sweep, tmp_path):
    client = MlflowClient(f"sqlite:///{sweep['root']}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get(ROLE_TAG) == "parent"]
    assert parent.info.status == "FINISHED"
    assert {"best_fid", "best_fid_low", "best_fid_high", "cost_total_images", "cost_refine_worker_s"} <= set(
        parent.data.metrics)
    assert parent.data.tags["guidetune.best_kind"] in KINDS
    assert {"best.yaml", "report.md", "curves.png", "screen_curves.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = [r.data.tags[STAGE_TAG] for r in children]
    refines = {s for s in stages if s.startswith("refine/")}
    assert refines and all(stages.count(s) == REFINE for s in refines)
    assert stages.count("screen") >= POINTS * len(KINDS)
    assert stages.count("proxy") >= N_TRIALS
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"vocab_evenness", "div_uncond", "wall_s", "images_per_s"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"samples.png", "guidance.png"}
        assert run.info.run_name.startswith(f"{run.data.tags[STAGE_TAG]} ")  # e.g. "proxy 3 · w=2.00"
        stage = run.data.tags[STAGE_TAG]
        if stage == "proxy":
            assert {"E", "D", "gap", "gap_tokens_cond"} <= set(run.data.metrics)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "scale.E")]
            assert sorted(steps) == list(range(len(PATCH_NUMS)))
        else:
            assert {"fid", "fid_low", "fid_high"} <= set(run.data.metrics)
            assert math.isfinite(run.data.metrics["fid"])


# ------------------------------------------------------------------ the winner again: python -m pipeline.generate


def best_yaml(sweep) -> Path:
    return sweep["root"] / "sweeps" / "e2e" / "best.yaml"


def test_generate_samples_exactly_the_winner_the_sweep_scored(sweep, tmp_path, capsys):
    best = read_best(best_yaml(sweep))
    end = best.holdout_from + best.num_images  # the images the winner's FID is of: holdout_from..end-1
    out = tmp_path / "winner"
    assert generate.main([f"generate.best={best_yaml(sweep)}", f"generate.num_images={end}",
                          f"generate.out={out}", "generate.grid=4"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"grid: {out / 'grid.png'}", f"samples: {out / 'samples.npz'}"]
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (end, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    extractor = sweep["root"].parent / "ckpt" / "cls.pt"  # the micro backbone's FID extractor (micro_overrides)
    cfg, _ = generate.configure([f"generate.best={best_yaml(sweep)}", f"generate.num_images={end}",
                                 f"confirm.extractor_weights={extractor}"])
    winner = Candidate(best.w_cfg, best.w_igg, best.window)
    assert (cfg.generate.w_cfg, cfg.generate.w_igg, cfg.generate.window) == (winner.w_cfg, winner.w_igg,
                                                                             winner.window)
    evaluator = FidEvaluator(cfg.backbone.fid_extractor, metrics=["fid"], weights_path=cfg.confirm.extractor_weights,
                             batch_size=cfg.confirm.batch_size, progress=False)
    backbone = load_var(cfg.backbone.vae_ckpt, cfg.backbone.var_ckpt)
    again_NF = evaluator.features(generate.images(backbone, cfg))[evaluator.feature_layer]
    bank = FeatureBank(best_yaml(sweep).parent / "features", [0, 24, 48, 72], best.sampling.sweep_seed)
    assert bank.seed_of(winner) == best.sampling.seed != best.sampling.sweep_seed  # the winner's own seeds
    scored_NF = bank.get(winner, end, [evaluator.feature_layer])[evaluator.feature_layer]
    torch.testing.assert_close(again_NF, scored_NF, rtol=1e-4, atol=1e-4)  # the images the race scored


def test_generate_refuses_another_checkpoint_and_bad_keys(sweep, tmp_path, capsys):
    best = read_best(best_yaml(sweep))
    other = tmp_path / "var.pt"
    other.write_bytes(Path(best.checkpoints["var_ckpt"].path).read_bytes() + b"\0")
    out = tmp_path / "never"
    for args, match in (
        ([f"backbone.var_ckpt={other}"], "is not the checkpoint the sweep used"),
        (["generate.num_images=0"], "generate.num_images=0 must be >= 1"),
        (["generate.window=4"], "window=4"),
        (["generate.nope=1"], "nope"),
        (["backbone=x"], "backbone"),
    ):
        assert generate.main([f"generate.best={best_yaml(sweep)}", f"generate.out={out}", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert generate.main([f"generate.best={tmp_path / 'none.yaml'}"]) == 2
    assert "give the best.yaml a sweep printed" in capsys.readouterr().err
    assert not out.exists()
    assert generate.main(["--help"]) == 0 and "generate.num_images" in capsys.readouterr().out
