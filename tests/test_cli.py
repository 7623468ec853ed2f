"""The command line as a Hydra application: --help, --cfg job, --info, shell completion, bad input refused in one line
before Hydra writes anything, and a real multirun (`python -m pipeline.sweep -m`, two guidance kinds on the micro
backbone, real local Ray and stores) that ends with its summary; plus the summary's arithmetic on hand-made sweeps.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from sweep_fixtures import micro_overrides, write_micro_backbone

from pipeline.outputs import summary
from pipeline.outputs.best import Best, CurveRecord, Default, MarginRecord, RhoRecord, Sampling, Versus
from pipeline.sweep import main

REPO = Path(__file__).resolve().parent.parent
FAST = [  # one sweep in seconds: no proxy, 3 screened points, 2 FID trials of 24 images, a race of one rung at 48
    "search.n_trials=0", "proxy.design=[0.5,1]", "screen.points=3", "screen.rungs=[24]", "screen.regions=1",
    "refine.n_trials=2", "refine.num_images=24", "confirm.finalists=1",
    "confirm.rungs=[48]", "confirm.bootstrap=20", "confirm.reference_num_images=40", "confirm.batch_size=24",
    "launcher.workers=1", "sweep.grid_images=4", "sweep.grid_nrow=2", "sweep.heatmap_images=2",
]

BACKBONE_OPTIONS = ("infinity_2b, infinity_8b, switti, switti_1024, switti_1024_ar, switti_ar, tiny, tiny_small, "
                    "var_d16, var_d20, var_d24, var_d30, var_d36")
BACKBONES_LINE = f"backbone: {BACKBONE_OPTIONS}"


def sweep_process(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.sweep ARGS` from `cwd`, importing this checkout."""
    return subprocess.run([sys.executable, "-m", "pipeline.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), **env})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    return write_micro_backbone(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, ckpt):
    """`python -m pipeline.sweep -m guidance=cfg,igg` on the micro backbone, run from an empty folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    root = tmp_path_factory.mktemp("multirun") / "root"
    proc = sweep_process(["-m", "guidance=cfg,igg", *micro_overrides(ckpt, root), *FAST], cwd)
    return {"proc": proc, "root": root, "cwd": cwd, "lines": proc.stdout.splitlines()}


# ------------------------------------------------------------------------------------------------ Hydra's flags


def test_help_lists_the_groups_and_the_common_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in (BACKBONES_LINE, "guidance: auto, cfg, igg, mixed",
                 "launcher: cluster, local", "search: default", "tracking: default"):
        assert line in out
    assert "-m backbone=tiny guidance=cfg,igg,mixed" in out and "summary: <path to summary.yaml>" in out
    assert all(key in out for key in ("sweep.name", "search.w_igg", "confirm.rungs", "launcher.workers", "--multirun"))
    assert "hydra/launcher" in out  # the note that tells the two launchers apart


def test_cfg_job_prints_the_yaml_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    assert main(["--cfg", "job", "--resolve", f"root={root}", "guidance=igg", "seed=5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["seed"], cfg["guidance"]["kinds"], cfg["sweep"]["name"]) == (5, ["igg"], "tiny-igg")
    assert cfg["sweep"]["output_dir"] == f"{root}/sweeps/tiny-igg" and "hydra" not in cfg
    assert list(tmp_path.iterdir()) == []  # no root, no outputs/, no .hydra


def test_info_shows_our_launcher_group_apart_from_hydras(tmp_path):
    proc = sweep_process(["--info", "defaults", f"root={tmp_path / 'root'}"], tmp_path)  # a process: --info sets up
    assert proc.returncode == 0, proc.stderr  # the logging of the process it runs in
    out = proc.stdout
    assert "| launcher/local " in out and "| hydra/launcher/basic " in out and "| hydra/job_logging/none " in out
    assert list(tmp_path.iterdir()) == []


def test_shell_completion_completes_groups_and_options(monkeypatch, capsys):
    monkeypatch.setenv("COMP_LINE", "python pipeline/sweep.py guidance=")
    monkeypatch.setenv("COMP_POINT", str(len("python pipeline/sweep.py guidance=")))
    assert main(["--shell-completion", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == ["guidance=auto", "guidance=cfg", "guidance=igg", "guidance=mixed"]


BAD = [
    (["backbone=nope"], f"backbone=nope is unknown; choose one of {BACKBONE_OPTIONS}"),
    (["nosuchkey=1"], "Could not override 'nosuchkey'"),
    (["search.w_cfg=[0,6"], "search.w_cfg=[0,6: no viable alternative"),
    (["guidance=cfg,igg"], "guidance=cfg,igg gives several values: add -m"),
    (["-m", "guidance=cfg,nope"], "guidance=nope is unknown; choose one of auto, cfg, igg, mixed"),
    (["-m", "guidance=cfg", "seed=0,1"], "jobs #0 (seed=0) and #1 (seed=1) would both be sweep.name=tiny-cfg; name"
                                         " each job, e.g. sweep.name='${backbone.name}-${guidance.name}-${seed}'"),
    (["-m", "search.w_cfg=[0,6]", "search.w_igg=[3,1],[0,6]"], "search.w_igg=[3.0, 1.0] is empty or inverted"),
    (["--cfg", "job", "backbone=nope"], "backbone=nope is unknown"),
    (["--cfg", "yaml"], "argument --cfg/-c: invalid choice: 'yaml'"),
    (["--nope"], "--nope is not a flag of this command"),
    (["seed=1", "-m", "guidance=cfg,igg"], "guidance=cfg,igg: give the overrides together, after the flags"),
    (["-m", "--cfg", "job"], "give at most one of --run, --multirun, --cfg"),
    (["--config-dir", "/tmp"], "--config-dir is not supported"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ckpt, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main([*args, *micro_overrides(ckpt, tmp_path / "root")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert message in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []  # no root (stores, hydra/), no outputs/


# ------------------------------------------------------------------------------------------------ a real multirun


def test_multirun_runs_one_sweep_per_job_and_ends_with_the_summary(multirun):
    proc, root = multirun["proc"], multirun["root"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    [folder] = (root / "hydra" / "multirun").iterdir()
    assert multirun["lines"][-1] == f"summary: {folder / 'summary.yaml'}"
    assert [line for line in multirun["lines"] if line.startswith("best: ")] == [
        f"best: {root / 'sweeps' / name / 'best.yaml'}" for name in ("tiny-cfg", "tiny-igg")]
    assert sorted(p.name for p in folder.iterdir()) == [
        "0-tiny-cfg", "1-tiny-igg", "multirun.yaml", "summary.md", "summary.png", "summary.yaml"]
    assert (folder / "0-tiny-cfg" / ".hydra" / "config.yaml").is_file()
    assert list(multirun["cwd"].iterdir()) == []  # hydra.run/sweep.dir under root, never outputs/ or multirun/


def test_summary_holds_every_job_and_the_best_per_backbone(multirun):
    [folder] = (multirun["root"] / "hydra" / "multirun").iterdir()
    data = yaml.safe_load((folder / "summary.yaml").read_text())
    assert [(j["sweep"], j["backbone"], j["guidance"]) for j in data["jobs"]] == [
        ("tiny-cfg", "tiny", "cfg"), ("tiny-igg", "tiny", "igg")]
    for job in data["jobs"]:
        best = yaml.safe_load((multirun["root"] / "sweeps" / job["sweep"] / "best.yaml").read_text())
        assert (job["kind"], job["fid"], job["fid_low"], job["fid_high"]) == (
            best["kind"], best["fid"], best["fid_low"], best["fid_high"])
        assert job["default_w_cfg"] == 1.5 and job["gain"] == best["default"]["gain"]
    best = min(data["jobs"], key=lambda j: j["fid"])
    assert data["backbones"]["tiny"]["sweep"] == best["sweep"] and data["backbones"]["tiny"]["fid"] == best["fid"]
    assert "## Best guidance per backbone" in (folder / "summary.md").read_text()
    assert (folder / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_is_one_mlflow_run_with_its_files_and_table(multirun):
    client = MlflowClient(f"sqlite:///{multirun['root']}/mlflow.db")
    experiment = client.get_experiment_by_name(summary.EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id])
    [folder] = (multirun["root"] / "hydra" / "multirun").iterdir()
    assert run.info.status == "FINISHED" and run.data.tags[summary.FOLDER_TAG] == str(folder)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "summary.yaml", "summary.md", "summary.png", "summary_table.json"}
    assert {"tiny-cfg.fid", "tiny-igg.fid", "tiny-cfg.gain"} <= set(run.data.metrics)


def test_summary_command_rebuilds_the_same_summary(multirun, tmp_path, capsys):
    [folder] = (multirun["root"] / "hydra" / "multirun").iterdir()
    before = (folder / "summary.yaml").read_text()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert summary.main([str(folder), "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"summary: {folder / 'summary.yaml'}"
    assert (folder / "summary.yaml").read_text() == before
    sweeps = multirun["root"] / "sweeps"
    args = [str(sweeps / "tiny-cfg"), str(sweeps / "tiny-igg" / "best.yaml"), "--out", str(tmp_path / "s"),
            "--tracking-uri", uri]
    assert summary.main(args) == 0
    assert (tmp_path / "s" / "summary.yaml").read_text() == before  # the sweep folders' names are the job names
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(summary.EXPERIMENT).experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted([folder.name, "s"])  # one run per summary folder
    assert summary.main(args) == 0  # built again: it replaces the folder's run
    again = client.search_runs([client.get_experiment_by_name(summary.EXPERIMENT).experiment_id])
    assert sorted(r.info.run_name for r in again) == sorted([folder.name, "s"])
    assert {r.info.run_id for r in again} != {r.info.run_id for r in runs}


def test_summary_command_refuses_what_is_not_a_sweep(multirun, tmp_path, capsys):
    for args, message in (([str(tmp_path / "nope")], "not a best.yaml, a sweep folder"),
                          ([str(multirun["root"] / "sweeps" / "tiny-cfg")], "--out is needed"),
                          ([str(multirun["root"] / "sweeps")], "not a best.yaml, a sweep folder")):
        assert summary.main([*args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------------------------------------ the arithmetic


def best(backbone: str, guidance: str, kind: str, fid: tuple[float, float, float], default: tuple | None,
         w_cfg: float | None = None, w_igg: float | None = None, n: int = 4096) -> Best:
    """A best.yaml as a finished sweep writes it (only what the summary reads is meaningful)."""
    out = None if default is None else Default(1.5, None, None, "cfg", n, *default, gain=default[0] - fid[0])
    return Best(backbone=backbone, guidance=guidance, kind=kind, w_cfg=w_cfg, w_igg=w_igg, window=None, fid=fid[0],
                fid_low=fid[1], fid_high=fid[2], num_images=n, at_bound={}, runner_up=None,
                margin=MarginRecord(1.0, 0.2, 1.8, n, True), default=out, cost={},
                sampling=Sampling("linear", 0, None, 0, 0.0, 1, 0, 64, 0.95, "200", [1, 2], "i % 8", "seeds"),
                checkpoints={})


def test_summarize_gains_and_the_best_guidance_per_backbone():
    result = summary.summarize([
        best("tiny", "cfg", "cfg", (9.0, 8.5, 9.5), (12.0, 11.0, 13.0), w_cfg=5.0),
        best("tiny", "igg", "igg", (7.5, 7.0, 8.0), (12.0, 11.0, 13.0), w_igg=10.0),
        best("var_d16", "cfg", "cfg", (3.1, 2.9, 3.3), (3.3, 3.1, 3.5), w_cfg=2.0),
        best("var_d16", "mixed", "mixed", (3.0, 2.8, 3.2), None, w_cfg=1.0, w_igg=2.0, n=2048),
    ])
    jobs = {j.sweep: j for j in result.jobs}
    assert list(jobs) == ["tiny-cfg", "tiny-igg", "var_d16-cfg", "var_d16-mixed"]
    assert jobs["tiny-cfg"].gain == pytest.approx(3.0) and jobs["tiny-cfg"].gain_pct == pytest.approx(25.0)
    assert jobs["tiny-igg"].gain == pytest.approx(4.5) and jobs["tiny-igg"].default_fid == 12.0
    assert jobs["var_d16-mixed"].gain is None and jobs["var_d16-mixed"].default_fid is None
    tiny, var = result.backbones["tiny"], result.backbones["var_d16"]
    assert (tiny.sweep, tiny.kind, tiny.w_igg, tiny.runner_up.sweep) == (
        "tiny-igg", "igg", 10.0, "tiny-cfg")
    assert tiny.separated is True and tiny.same_num_images is True  # 8.0 < 8.5: the intervals do not overlap
    assert (var.sweep, var.separated, var.same_num_images) == ("var_d16-mixed", False, False)
    assert result.level == 0.95
    text = summary.summary_markdown(result)
    assert "**tiny**: igg w'=10.00 win=global (sweep tiny-igg), FID 7.50 [7.00, 8.00]" in text
    assert "separated from the runner-up tiny-cfg" in text
    assert "**not separated** from the runner-up var_d16-cfg" in text
    assert "| tiny-cfg | tiny | cfg | cfg | 5.00 | - | - | 9.00 [8.50, 9.50] | 4096 | w=1.50 |" in text
    assert "+3.00 (25 %)" in text and "different N" in text
    assert summary.summary_png(result)[:4] == b"\x89PNG"


def test_the_summary_says_which_fids_are_on_hold_out_images():
    held = dataclasses.replace(best("tiny", "igg", "igg", (7.5, 7.0, 8.0), None, w_igg=10.0, n=2048),
                               holdout_from=2048)
    whole = best("tiny", "cfg", "cfg", (9.0, 8.5, 9.5), None, w_cfg=5.0, n=2048)
    result = summary.summarize([held, whole])
    jobs = {j.sweep: j for j in result.jobs}
    assert jobs["tiny-igg"].holdout_from == 2048 and jobs["tiny-cfg"].holdout_from is None
    assert result.backbones["tiny"].same_num_images is False  # one N, but only one FID on hold-out images
    text = summary.summary_markdown(result)
    assert "| 7.50 [7.00, 8.00] | 2048 hold-out |" in text and "| 9.00 [8.50, 9.50] | 2048 |" in text
    assert "FID 7.50 [7.00, 8.00] at N=2048 hold-out" in text
    assert summary.summarize([held]).backbones["tiny"].same_num_images is True


def test_the_summary_shows_the_whole_range_igg_against_cfg_and_the_proxy():
    sweep = best("tiny_small", "auto", "cfg", (24.0, 23.0, 25.0), None, w_cfg=20.0)
    curve = CurveRecord("cfg", 256, [0.25, 4.0, 20.0], [80.0, 45.0, 26.0], [75.0, 40.0, 24.0], [85.0, 50.0, 28.0],
                        [79.0, 44.0, 26.5])
    sweep = dataclasses.replace(sweep, curves={"cfg": curve}, proxy_rho=RhoRecord(-0.5, -0.8, -0.1, 33), versus=Versus(
        -3.0, -5.0, -1.0, verdict="CFG beats IGG on this backbone: FID(CFG) - FID(IGG) = -3 [-5, -1]"))
    result = summary.summarize([sweep])
    assert result.curves == {"tiny_small-auto": {"cfg": curve}}
    text = summary.summary_markdown(result)
    assert "- **tiny_small-auto**: CFG beats IGG on this backbone" in text
    assert "ρ(gap, FID) = -0.50 [-0.80, -0.10] over 33 screened points" in text and "wrong way" in text
    with_curves, without = summary.summary_png(result), summary.summary_png(dataclasses.replace(result, curves={}))
    assert with_curves[:4] == b"\x89PNG" and len(with_curves) > len(without)  # the curve panel is drawn


def test_summarize_names_and_a_single_sweep():
    result = summary.summarize([best("tiny", "auto", "cfg", (9.0, 8.0, 10.0), (9.0, 8.0, 10.0), w_cfg=1.5)],
                               names=["run1"])
    assert result.jobs[0].sweep == "run1" and result.jobs[0].gain == 0.0
    assert result.backbones["tiny"].runner_up is None and result.backbones["tiny"].separated is None
    assert "the only sweep of this backbone" in summary.summary_markdown(result)
