"""Every check that can refuse a sweep, run once before Hydra writes anything: the config of every job, colliding
sweep names, the checkpoints (loaded once, weights only), a resumed sweep's settings, a named Ray cluster, and the FID
reference statistics, which the job then reuses (:func:`checked`). Each problem is one line (ConfigError, a
ValueError, or ConnectionError); pipeline.sweep prints it and exits 2."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import ray
import torch

from pipeline.backbones.load import load_backbone
from pipeline.config.schema import GROUPS, ConfigError, SweepConfig, load_config
from pipeline.data.files import sqlite_path, store_lock
from pipeline.fid.fidelity import FidEvaluator, Reference, reference_source
from pipeline.runtime.distributed import check_capacity, connect
from pipeline.runtime.tracking import flatten
from tuners.studies import study_name

SETTINGS_ATTR = "settings"  # proxy-study user attr: the settings a resumed sweep must keep
_CHECKED: dict[str, tuple[FidEvaluator, Reference]] = {}  # sweep.name -> what the checks computed for the job


def resume_settings(cfg: SweepConfig) -> dict[str, Any]:
    """The settings that define a sweep's trials; rerunning a sweep name with other values is refused."""
    search = {k: v for k, v in asdict(cfg.search).items() if k != "n_trials"}
    return {"seed": cfg.seed, "backbone": asdict(cfg.backbone), "guidance": asdict(cfg.guidance), "search": search,
            "proxy": asdict(cfg.proxy), "screen": asdict(cfg.screen), "refine": asdict(cfg.refine),
            "confirm": asdict(cfg.confirm),
            "workers": cfg.launcher.workers}


def check_resume(cfg: SweepConfig) -> None:
    """Refuse to resume a sweep name created with different settings (reads the store only if it exists); a key
    added to the schema since, at its default, is no difference."""
    db = sqlite_path(cfg.storage)
    if db is not None and not db.is_file():
        return
    name = study_name(cfg.sweep.name, "proxy")
    try:
        with store_lock(cfg.storage):
            stored = optuna.load_study(study_name=name, storage=cfg.storage).user_attrs.get(SETTINGS_ATTR)
    except KeyError:
        return
    if stored is None:
        return
    flat_old, flat_new = flatten(stored), flatten(resume_settings(cfg))
    defaults = flatten(resume_settings(SweepConfig()))
    # a key newer than the stored sweep, at its schema default, samples as the sweep did
    diff = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
                  and not (k not in flat_old and k in defaults and flat_new[k] == defaults[k]))
    if diff:
        key = diff[0]
        raise ConfigError(
            f"sweep.name={cfg.sweep.name} exists with {key}={flat_old.get(key)} (now {flat_new.get(key)}); "
            "rerun with the original settings to resume, or choose a new sweep.name"
        )


def check_backbone(cfg: SweepConfig) -> None:
    """Load the checkpoint pair once (weights_only) and check it matches the configured patch schedule."""
    backbone = load_backbone(cfg.backbone, device="cpu")
    found = list(backbone.patch_nums)
    del backbone
    if found != list(cfg.backbone.patch_nums):
        raise ConfigError(
            f"backbone.patch_nums={list(cfg.backbone.patch_nums)} but {cfg.backbone.var_ckpt} has {found}; "
            f"fix conf/backbone/{cfg.backbone.name}.yaml or pass the matching checkpoint"
        )


def fid_reference(cfg: SweepConfig) -> tuple[FidEvaluator, Reference]:
    """The driver's FID evaluator and the reference statistics (computed here, cached under <root>/fid_cache)."""
    # A weights file torch.load(weights_only=True) refuses raises one ValueError naming it (pipeline.data.files).
    evaluator = FidEvaluator(
        cfg.backbone.fid_extractor,
        metrics=cfg.confirm.metrics,
        weights_path=cfg.confirm.extractor_weights,
        batch_size=cfg.confirm.batch_size,
        cache_dir=Path(cfg.root) / "fid_cache",
        progress=False,  # an error below must stay one line
        image_size=cfg.backbone.fid_image_size,
    )
    source = reference_source(
        cfg.confirm.reference,
        num_images=cfg.confirm.reference_num_images,
        seed=cfg.seed,
        batch_size=cfg.confirm.batch_size,
    )
    probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)  # one blank image: the extractor's feature count
    features = evaluator.features([probe])[evaluator.feature_layer].shape[1]
    if cfg.screen.rungs[0] <= features:
        raise ConfigError(f"screen.rungs={cfg.screen.rungs} must start above the {features} features of "
                          f"{cfg.backbone.fid_extractor} (FID needs more images than features); raise them")
    try:
        reference = evaluator.reference(source)
    except ValueError as err:
        if cfg.confirm.reference in str(err):  # already names the file and the fix
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"confirm.reference: {cfg.confirm.reference} cannot be read ({reason}); give an ADM .npz, an image "
            "folder or 'shapes' (the embedded dataset)"
        ) from None
    return evaluator, reference


def check_names(jobs: list[list[str]], cfgs: list[SweepConfig]) -> None:
    """Refuse jobs of -m that would share a sweep.name (the second would resume, or be refused by, the first)."""
    first: dict[str, int] = {}
    for i, cfg in enumerate(cfgs):
        j = first.setdefault(cfg.sweep.name, i)
        if j == i:
            continue
        a, b = (dict(o.split("=", 1) for o in jobs[k] if "=" in o) for k in (j, i))
        differ = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
        keys = "".join(f"-${{{k}}}" for k in sorted(differ) if k not in GROUPS and not k.startswith("hydra"))
        shown = [" ".join(f"{k}={job.get(k)}" for k in sorted(differ)) for job in (a, b)]
        raise ConfigError(
            f"-m: jobs #{j} ({shown[0]}) and #{i} ({shown[1]}) would both be sweep.name={cfg.sweep.name}; name each "
            f"job, e.g. sweep.name='${{backbone.name}}-${{guidance.name}}{keys or '-${seed}'}'"
        )


def preflight(jobs: list[list[str]]) -> None:
    """Every check that can refuse a job, for every job, before Hydra writes anything (its run folder included).

    Compose and validate each job's config, refuse colliding sweep names, load each checkpoint pair once (weights
    only), refuse a resumed sweep with other settings, reach a named Ray cluster (bounded wait) and check it can
    place the actors, and compute the FID reference statistics (kept for the job: :func:`checked`; also cached
    under <root>/fid_cache). Raises ValueError (ConfigError) or ConnectionError, one line each.
    """
    cfgs = [load_config(overrides) for overrides in jobs]
    check_names(jobs, cfgs)
    loaded: set[tuple] = set()
    for cfg in cfgs:
        pair = (cfg.backbone.vae_ckpt, cfg.backbone.var_ckpt, tuple(cfg.backbone.patch_nums))
        if pair not in loaded:
            check_backbone(cfg)
            loaded.add(pair)
        check_resume(cfg)
    for cfg in cfgs:
        if cfg.launcher.address is not None:  # a cluster that does not answer fails fast, before the reference
            try:
                connect(cfg.launcher)
                check_capacity(cfg.launcher)
            finally:
                ray.shutdown()  # only disconnects this driver; the job connects again
        _CHECKED[cfg.sweep.name] = fid_reference(cfg)


def checked(cfg: SweepConfig) -> tuple[FidEvaluator, Reference]:
    """The FID evaluator and reference statistics the checks computed for this job (computed now when the job did
    not come through :func:`preflight`, e.g. Hydra's own entry point; from the cache then)."""
    found = _CHECKED.pop(cfg.sweep.name, None)
    return found if found is not None else fid_reference(cfg)


