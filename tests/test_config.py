"""Sweep configuration: every conf/ group composes with Hydra; every bad value is refused before anything is touched.

Refusals go through the real entry point (`pipeline.sweep.main`, in-process for speed; one case as a subprocess):
exit code 2, exactly one line on stderr naming the key and the fix, and the sweep's root folder never created.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from sweep_fixtures import micro_overrides, write_micro_backbone

from pipeline.config.schema import (
    CONF_DIR,
    GROUPS,
    WEIGHTS_DIR,
    ConfigError,
    ConfirmConfig,
    LauncherConfig,
    ProxyConfig,
    RefineConfig,
    ScreenConfig,
    SearchConfig,
    SweepConfig,
    compose_config,
    group_options,
    load_config,
    to_schema,
)
from pipeline.preflight import SETTINGS_ATTR, check_resume, resume_settings
from pipeline.sweep import main
from tuners.studies import study_name

REPO = Path(__file__).resolve().parent.parent

BACKBONE_OPTIONS = ("infinity_2b, infinity_8b, switti, switti_1024, switti_1024_ar, switti_ar, tiny, tiny_small, "
                    "var_d16, var_d20, var_d24, var_d30, var_d36")
BACKBONES_LINE = f"backbone: {BACKBONE_OPTIONS}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """The micro backbone, plus files that are not a VAR state dict."""
    d = tmp_path_factory.mktemp("ckpt")
    paths = write_micro_backbone(d)
    torch.save([1, 2, 3], d / "list.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "evil.pt").write_bytes(pickle.dumps(Evil()))
    np.savez(d / "bad_reference.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    return {**paths, "list": d / "list.pt", "evil": d / "evil.pt", "bad_reference": d / "bad_reference.npz"}


def valid(ckpt, root: Path) -> list[str]:
    return micro_overrides(ckpt, root)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes(group, option):
    cfg = to_schema(compose_config([f"{group}={option}"]))
    node = getattr(cfg, group)
    if group == "backbone":
        assert node.name == option
        if option.startswith("var_d"):
            assert (node.top_k, node.top_p, node.default_cfg) == (900, 0.96, 1.5)
            assert node.patch_nums[-1] == (32 if option == "var_d36" else 16)
            assert node.var_ckpt.endswith(f"{option}.pth") and node.fid_extractor == "inception-v3-compat"
        elif option.startswith("switti"):
            assert (node.kind, node.top_k, node.top_p, node.default_cfg, node.drop_uncond) == (
                "switti", 400, 0.95, 6.0, True)
            assert node.patch_nums[-1] == (64 if "1024" in option else 32)
            assert node.text_encoder and node.text_encoder_2 and node.prompts.endswith(".csv")
        elif option.startswith("infinity"):     # the official cfg 4 (2B) / 3 (8B) is our 1 + w
            assert (node.kind, node.top_k, node.top_p, node.default_cfg, node.tau, node.patch_nums[-1]) == (
                "infinity", 900, 0.97, *{"infinity_2b": (3.0, [0.5]), "infinity_8b": (2.0, [1.0])}[option], 64)
            assert node.text_encoder and node.prompts.endswith(".csv")
            assert node.var_ckpt.endswith({"infinity_2b": ".pth", "infinity_8b": "infinity_8b_weights"}[option])
        else:
            assert Path(node.var_ckpt).parent == WEIGHTS_DIR and node.fid_reference == "shapes"
        assert cfg.confirm.reference == node.fid_reference  # interpolated default
    if group == "guidance":
        assert node.name == option
        assert {"auto": ["cfg", "igg", "mixed"], "cfg": ["cfg"], "igg": ["igg"], "mixed": ["mixed"]}[option] == \
            node.kinds


def test_group_options_are_the_yaml_files():
    assert group_options("backbone") == ["infinity_2b", "infinity_8b", "switti", "switti_1024", "switti_1024_ar",
                                         "switti_ar", "tiny", "tiny_small", "var_d16", "var_d20", "var_d24", "var_d30",
                                         "var_d36"]
    assert group_options("guidance") == ["auto", "cfg", "igg", "mixed"]
    assert all((CONF_DIR / g).is_dir() and group_options(g) for g in GROUPS)


def test_defaults_and_derived_paths():
    cfg = to_schema(compose_config([]))
    assert (cfg.backbone.name, cfg.guidance.name, cfg.launcher.workers) == ("tiny", "auto", 2)
    assert cfg.guidance.kinds == ["cfg", "igg", "mixed"]
    assert cfg.sweep.name == "tiny-auto"
    assert cfg.tracking.uri == "sqlite:///mlruns/mlflow.db"  # the store `make ui` opens
    assert cfg.storage == "sqlite:///mlruns/optuna.db"
    assert cfg.sweep.output_dir == "mlruns/sweeps/tiny-auto"
    assert cfg.search.windows == [None] and cfg.search.sampler == "tpe"
    assert cfg.search.intervals is None and cfg.search.interval_choices() is None
    searched = load_config(["guidance.schedule=interval", "search.intervals=[[0,null],[2,5]]"]).search
    assert searched.interval_choices() == [(0, None), (2, 5)]
    constant = load_config(["guidance.schedule=constant_interval", "search.intervals=[[0,4]]"]).search
    assert constant.interval_choices() == [(0, 4)]    # Infinity's [c, ..., c, 1, ..., 1] searched
    other = to_schema(compose_config(["root=/x", "sweep.name=abc"]))
    assert (other.storage, other.tracking.uri, other.sweep.output_dir) == (
        "sqlite:////x/optuna.db", "sqlite:////x/mlflow.db", "/x/sweeps/abc")


def test_command_line_keys(ckpt, tmp_path):
    keys = ["sweep.name=k1", "seed=7", "guidance=cfg", "search.n_trials=9", "search.sampler=gp",
            "proxy.num_images=5", "confirm.finalists=3", "confirm.rungs=[640,1280]", "confirm.reference=shapes",
            "launcher.workers=1", "launcher.address=auto", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            f"storage=sqlite:///{tmp_path}/o.db"]
    cfg = load_config(valid(ckpt, tmp_path / "r") + keys)
    assert (cfg.sweep.name, cfg.seed, cfg.guidance.name, cfg.search.n_trials, cfg.search.sampler) == (
        "k1", 7, "cfg", 9, "gp")
    assert (cfg.proxy.num_images, cfg.confirm.finalists, cfg.confirm.rungs, cfg.launcher.workers) == (
        5, 3, [640, 1280], 1)
    assert cfg.launcher.address == "auto" and cfg.storage.endswith("/o.db") and cfg.tracking.uri.endswith("/m.db")
    assert not (tmp_path / "r").exists()


BAD = [
    (["backbone=var_d99"], f"backbone=var_d99 is unknown; choose one of {BACKBONE_OPTIONS}"),
    (["guidance=clip"], "guidance=clip is unknown; choose one of auto, cfg, igg, mixed"),
    (["guidance.kinds=[cfg,clip]"], "guidance.kinds=clip is unknown; choose one of cfg, igg, mixed"),
    (["guidance.kinds=[cfg,cfg]"], "guidance.kinds=['cfg', 'cfg'] must list distinct kinds"),
    (["search.sampler=cmaes"], "search.sampler=cmaes is unknown; choose one of tpe, gp, random"),
    (["proxy.evenness=gini"], "proxy.evenness=gini is unknown"),
    (["proxy.reference=both"], "proxy.reference=both is unknown"),
    (["search.w_cfg=[4,1]"], "search.w_cfg=[4.0, 1.0] is empty or inverted"),
    (["search.w_igg=[2,2]"], "search.w_igg=[2.0, 2.0] is empty or inverted"),
    (["search.w_cfg=[-1,2]"], "search.w_cfg: guidance weights start at 0"),
    (["search.windows=[null,4]"], "search.windows: 4 is not an odd size"),
    (["search.windows=[0]"], "search.windows: 0 is not an odd size"),
    (["search.windows=[-3]"], "search.windows: -3 is not an odd size"),
    (["search.windows=[]"], "search.windows is empty"),
    (["search.intervals=[[0,null]]"], "search.intervals needs guidance.schedule=interval or constant_interval"),
    (["confirm.clip_weights=/tmp"], "confirm.clip_weights scores images against prompts"),
    (["guidance.schedule=interval", "search.intervals=[]"], "search.intervals is empty"),
    (["guidance.schedule=interval", "search.intervals=[[3,2]]"], "search.intervals: [3, 2] is not a new"),
    (["guidance.schedule=interval", "search.intervals=[[0,9]]"], "search.intervals: [0, 9] is not a new"),
    (["guidance.schedule=interval", "search.intervals=[[1,null],[1,null]]"], "search.intervals: [1, None] is not"),
    (["guidance.schedule=interval", "search.intervals=[4]"], "search.intervals: 4 is not a new"),
    (["search.n_trials=-1"], "search.n_trials and search.max_grows must be >= 0"),
    (["search.w_igg=[0,40]"], "search.w_igg=[0.0, 40.0] reaches past search.max_weight=30.0"),
    (["search.edge=1.5"], "search.edge=1.5 must lie strictly between 0 and 1"),
    (["refine.grow=0.5"], "refine.grow=0.5 must be > 1"),
    (["refine.sampler=gp"], "refine.sampler=gp is unknown; choose one of tpe, random"),
    (["refine.n_trials=0"], "refine.n_trials must be positive (got 0)"),
    (["confirm.level=1"], "confirm.level=1.0 must lie strictly between 0 and 1"),
    (["confirm.bootstrap=1"], "confirm.bootstrap=1 must be >= 2"),
    (["confirm.rungs=[1024,256]"], "confirm.rungs=[1024, 256] must rise above refine.num_images=512"),
    (["confirm.rungs=[1000]"], "must be multiples of confirm.batch_size=64"),
    (["proxy.num_images=-4"], "proxy.num_images must be positive (got -4)"),
    (["confirm.finalists=0"], "confirm.finalists must be positive"),
    (["screen.rungs=[16]", "refine.num_images=32", "confirm.batch_size=16"],
     "screen.rungs=[16] must start above the 16 features of"),
    (["screen.rungs=[512,256]"], "screen.rungs=[512, 256] must rise, up to refine.num_images=512; "
                                 "e.g. screen.rungs=[256,512]"),
    (["screen.rungs=[256,1024]"], "screen.rungs=[256, 1024] must rise, up to refine.num_images=512"),
    (["screen.points=1"], "screen.points=1 must be >= 2 (the ends of the range); e.g. screen.points=10"),
    (["screen.keep=0"], "screen.keep=0.0 must lie in (0, 1]"),
    (["screen.shares=[1.5]"], "screen.shares=[1.5] must hold shares of w' in w + w' strictly between 0 and 1"),
    (["screen.regions=0"], "screen.regions must be positive (got 0); set e.g. screen.regions=3"),
    (["launcher.workers=0"], "launcher.workers must be positive"),
    (["search.n_trials=abc"], "search.n_trials=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["search.nope=1"], "Key 'nope' not in 'SearchConfig'"),
    (["+extra=1"], "+extra=1: adding or deleting keys is not supported"),
    (["confirm.metrics=[isc]"], "confirm.metrics must include fid"),
    (["proxy.design=[0.5,2]"], "proxy.design=[0.5, 2.0] must hold fractions in [0, 1]"),
    (["guidance.schedule=cosine"], "guidance.schedule=cosine is unknown"),
    (["confirm.reference=/nonexistent/ref.npz"], "confirm.reference: /nonexistent/ref.npz not found"),
    (["backbone.var_ckpt=/nonexistent/var.pth"], "backbone.var_ckpt: /nonexistent/var.pth not found"),
    (["backbone.patch_nums=[1,2,3]"], "backbone.patch_nums=[1, 2, 3] but"),
    (["confirm.extractor_weights=/nonexistent/cls.pt"], "confirm.extractor_weights: /nonexistent/cls.pt not found"),
    (["launcher.address=127.0.0.1:1", "launcher.connect_timeout_s=1"], "launcher.address=127.0.0.1:1: no Ray"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(ckpt, tmp_path, capsys, overrides, message):
    root = tmp_path / "root"
    assert main(valid(ckpt, root) + overrides) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not root.exists()


@pytest.mark.parametrize("key,which,message", [
    ("backbone.var_ckpt", "list", "not a state dict"), ("backbone.var_ckpt", "evil", "weights_only"),
    ("backbone.var_ckpt", "vae", "not a VAR state dict"), ("backbone.vae_ckpt", "var", "not a VQVAE state dict"),
    ("confirm.reference", "bad_reference", "has no mu/sigma (FID statistics) and no arr_0 images"),
])
def test_bad_files_are_refused(ckpt, tmp_path, capsys, key, which, message):
    root = tmp_path / "root"
    assert main([*valid(ckpt, root), f"{key}={ckpt[which]}"]) == 2
    err = capsys.readouterr()
    assert message in err.err and "pwned" not in err.out
    assert not root.exists()


def test_embedded_weights_missing_says_how_to_get_them(tmp_path):
    missing = WEIGHTS_DIR / "no_such_tiny.pt"
    with pytest.raises(ConfigError, match="embedded weights are missing"):
        load_config([f"root={tmp_path}", f"backbone.var_ckpt={missing}"])


def test_unwritable_root_is_refused(ckpt):
    overrides = valid(ckpt, Path("/etc/hostname/sub"))
    with pytest.raises(ConfigError, match="is not writable"):
        load_config(overrides)


def test_resume_with_other_settings_is_refused(ckpt, tmp_path, capsys):
    overrides = [*valid(ckpt, tmp_path), "sweep.name=r1"]
    cfg = load_config(overrides)
    study = optuna.create_study(storage=cfg.storage, study_name=study_name("r1", "proxy"))
    study.set_user_attr(SETTINGS_ATTR, resume_settings(cfg))
    assert main([*overrides, "search.w_cfg=[0,3]"]) == 2
    assert "sweep.name=r1 exists with search.w_cfg=[0.0, 6.0] (now [0.0, 3.0])" in capsys.readouterr().err
    assert resume_settings(load_config([*overrides, "search.n_trials=50"])) == resume_settings(cfg)
    older = resume_settings(cfg)            # a sweep stored before backbone.tau and negative_prompt existed
    del older["backbone"]["tau"], older["backbone"]["negative_prompt"]
    study.set_user_attr(SETTINGS_ATTR, older)
    check_resume(cfg)
    with pytest.raises(ConfigError, match=r"exists with backbone\.top_k=0 \(now 5\)"):
        check_resume(load_config([*overrides, "backbone.top_k=5"]))


def test_help_and_cfg(capsys):
    assert main(["--help"]) == 0
    assert BACKBONES_LINE in capsys.readouterr().out
    assert main(["--cfg", "job", "--resolve", "seed=3", "guidance=igg"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "name: tiny-igg" in out and "rungs:" in out


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", f"root={root}", "search.w_cfg=[5,1]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: search.w_cfg=[5.0, 1.0] is empty or inverted; give low < high, e.g. search.w_cfg=[0,6]"]
    assert "Traceback" not in proc.stderr and not root.exists()


def test_each_default_is_stated_once_in_the_schema():
    """The schema (pipeline/config/schema.py) holds every default once: a group's YAML sets only what its option changes
    (the default options set nothing; an option that extends another may set a key back to the schema's default,
    as infinity_8b's tau), so editing a dataclass default changes what the CLI composes."""
    schema = SweepConfig()

    def read(group: str, option: str) -> tuple[dict, dict]:
        """An option's own keys, and those of the options it extends (conf/backbone/var_d20.yaml)."""
        data = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
        inherited = {}
        for parent in data.pop("defaults", []):
            if parent != "_self_":
                own, above = read(group, parent)
                inherited |= above | own
        return data, inherited

    for group in ("backbone", "search", "proxy", "screen", "refine", "confirm", "launcher", "tracking"):
        for option in group_options(group):
            data, inherited = read(group, option)
            assert all(getattr(getattr(schema, group), k) != v or inherited.get(k, v) != v for k, v in data.items()), (
                group, option, data)
            assert option not in ("default", "local") or data == {}, (group, option, data)
    cfg = to_schema(compose_config([]))
    assert (cfg.search, cfg.proxy, cfg.screen, cfg.refine, cfg.launcher) == (
        SearchConfig(), ProxyConfig(), ScreenConfig(), RefineConfig(), LauncherConfig())
    assert cfg.confirm == replace(ConfirmConfig(), reference=cfg.backbone.fid_reference)
