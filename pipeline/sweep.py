"""Entry point: ``python -m pipeline.sweep [group=option] [key=value ...]`` (Hydra overrides on conf/sweep.yaml).

Order of work, so that bad input touches nothing: compose and validate the config, load the checkpoints once to check
them, check a resumed sweep has the same settings, reach the Ray cluster if one is named (bounded wait), compute the
FID reference statistics (cached), start a local Ray if none is named; only then create the MLflow and Optuna stores
and start the actors. Stages: calibration -> proxy -> confirm ->
report. The last line printed is ``best: <path to best.yaml>``. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import ray
from omegaconf import OmegaConf

from pipeline.backbones.var import load_var
from pipeline.config import (
    CONF_DIR,
    GROUPS,
    ConfigError,
    SweepConfig,
    as_dict,
    compose_config,
    group_options,
    load_config,
    sqlite_path,
    store_lock,
)
from pipeline.distributed import ClusterLostError, RayPool, check_capacity, connect
from pipeline.fid import FidEvaluator, Reference, reference_source
from pipeline.files import atomic_write
from pipeline.report import (
    Best,
    gap_vs_fid_png,
    report_markdown,
    signals_vs_weight_png,
    write_best,
)
from pipeline.tracking import Tracker
from tuners.confirm import PROXY, Confirmed, baselines, best_of, run_confirm, select_candidates, spearman
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, Job
from tuners.proxy import Calibration, calibrate, gap_name, job_key, run_proxy
from tuners.space import design_points
from tuners.studies import counts_toward_budget, open_study, study_name

SETTINGS_ATTR = "settings"  # proxy-study user attr: the settings a resumed sweep must keep
STAGES = ("calibration", "proxy", "confirm")  # one Optuna study each (run_proxy seeds a sampler for each ask)


def resume_settings(cfg: SweepConfig) -> dict[str, Any]:
    """The settings that define a sweep's trials; rerunning a sweep name with other values is refused."""
    search = {k: v for k, v in asdict(cfg.search).items() if k != "n_trials"}
    return {"seed": cfg.seed, "backbone": asdict(cfg.backbone), "guidance": asdict(cfg.guidance), "search": search,
            "proxy": asdict(cfg.proxy)}


def check_resume(cfg: SweepConfig) -> None:
    """Refuse to resume a sweep name created with different settings (reads the store only if it exists)."""
    db = sqlite_path(cfg.storage)
    if db is not None and not db.is_file():
        return
    name = study_name(cfg.sweep.name, "proxy")
    try:
        with store_lock(cfg.storage):
            stored = optuna.load_study(study_name=name, storage=cfg.storage).user_attrs.get(SETTINGS_ATTR)
    except KeyError:
        return
    current = resume_settings(cfg)
    if stored is not None and stored != current:
        flat_old, flat_new = _flat(stored), _flat(current)
        diff = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
        key = diff[0] if diff else "?"
        raise ConfigError(
            f"sweep.name={cfg.sweep.name} exists with {key}={flat_old.get(key)} (now {flat_new.get(key)}); "
            "rerun with the original settings to resume, or choose a new sweep.name"
        )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_backbone(cfg: SweepConfig) -> None:
    """Load the checkpoint pair once (weights_only) and check it matches the configured patch schedule."""
    backbone = load_var(cfg.backbone.vae_ckpt, cfg.backbone.var_ckpt, device="cpu")
    found = list(backbone.patch_nums)
    del backbone
    if found != list(cfg.backbone.patch_nums):
        raise ConfigError(
            f"backbone.patch_nums={list(cfg.backbone.patch_nums)} but {cfg.backbone.var_ckpt} has {found}; "
            f"fix conf/backbone/{cfg.backbone.name}.yaml or pass the matching checkpoint"
        )


def fid_reference(cfg: SweepConfig) -> Reference:
    """Reference statistics for the confirm stage, computed in the driver (cached under <root>/fid_cache)."""
    # A weights file torch.load(weights_only=True) refuses raises one ValueError naming it (pipeline.files).
    evaluator = FidEvaluator(
        cfg.backbone.fid_extractor,
        metrics=cfg.confirm.metrics,
        weights_path=cfg.confirm.extractor_weights,
        batch_size=cfg.confirm.batch_size,
        cache_dir=Path(cfg.root) / "fid_cache",
    )
    source = reference_source(
        cfg.confirm.reference,
        num_images=cfg.confirm.reference_num_images,
        seed=cfg.seed,
        batch_size=cfg.confirm.batch_size,
    )
    try:
        return evaluator.reference(source)
    except ValueError as err:
        if cfg.confirm.reference in str(err):  # already names the file and the fix
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"confirm.reference: {cfg.confirm.reference} cannot be read ({reason}); give an ADM .npz, an image "
            "folder or 'shapes' (the embedded dataset)"
        ) from None


def write_outputs(
    cfg: SweepConfig,
    entries: list[Confirmed],
    best: Confirmed,
    rho: float,
    proxy_trials: list[optuna.trial.FrozenTrial],
    calibration: Calibration,
) -> tuple[Path, list[Path]]:
    """best.yaml, report.md and the two plots in sweep.output_dir; returns (best.yaml, all files)."""
    out = Path(cfg.sweep.output_dir)
    c = best.candidate
    best_path = write_best(
        out / "best.yaml",
        Best(cfg.backbone.name, cfg.guidance.name, c.w_cfg, c.w_igg, c.window, best.fid, best.gap, rho),
    )
    markdown = report_markdown(
        f"guidetune sweep {cfg.sweep.name}", entries, best, rho, cfg.confirm.small_num_images, cfg.confirm.num_images
    )
    files = [best_path, atomic_write(out / "report.md", markdown.encode())]
    files.append(atomic_write(out / "gap_vs_fid.png", gap_vs_fid_png(entries, rho)))
    weight = "w_cfg" if "w_cfg" in cfg.guidance.params else "w_igg"
    e_name, d_name = EVENNESS_SIGNAL[cfg.proxy.evenness], DIVERGENCE_SIGNAL[cfg.proxy.reference]
    (e_lo, e_hi), (d_lo, d_hi) = calibration.ranges[e_name], calibration.ranges[d_name]
    signals = [(t.params[weight], t.user_attrs["result"]["signals"]) for t in proxy_trials]
    rows = [(w, (s[e_name] - e_lo) / (e_hi - e_lo), (s[d_name] - d_lo) / (d_hi - d_lo)) for w, s in signals]
    files.append(atomic_write(out / "proxy_signals.png", signals_vs_weight_png(weight, rows)))
    return best_path, files


def run(cfg: SweepConfig, reference: Reference) -> Path:
    """Run (or resume) the sweep of a validated config on a connected Ray; returns the path of best.yaml."""
    e_name, d_name = EVENNESS_SIGNAL[cfg.proxy.evenness], DIVERGENCE_SIGNAL[cfg.proxy.reference]
    studies = {stage: open_study(cfg.storage, study_name(cfg.sweep.name, stage)) for stage in STAGES}
    kept = {(stage, t.number) for stage, s in studies.items() for t in s.get_trials(deepcopy=False)
            if counts_toward_budget(t)}
    tracker = Tracker(cfg.tracking.uri, cfg.sweep.name, (e_name, d_name))
    tracker.open_parent(as_dict(cfg), kept)  # runs of trials a dead driver left unfinished become KILLED
    status = "FAILED"
    try:
        best_path = _stages(cfg, reference, tracker, studies)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
    return best_path


def _stages(cfg: SweepConfig, reference: Reference, tracker: Tracker, studies: dict[str, optuna.Study]) -> Path:
    calibration_study, proxy_study, confirm_study = (studies[stage] for stage in STAGES)
    proxy_study.set_user_attr(SETTINGS_ATTR, resume_settings(cfg))
    pool = RayPool(cfg, reference)
    try:
        base = baselines(cfg.backbone)
        points = design_points(cfg.guidance, cfg.search, cfg.proxy.calibration) + [c for c, _ in base]
        calibration = calibrate(calibration_study, proxy_study, pool, points, cfg.proxy, cfg.seed, tracker)
        trials = run_proxy(proxy_study, pool, cfg.guidance, cfg.search, cfg.proxy, calibration, cfg.seed, tracker)
        if not trials:
            raise RuntimeError("no proxy trial finished; see the failed runs in MLflow (`make ui`), then rerun")
        objective = gap_name(cfg.proxy.evenness, cfg.proxy.reference)
        entries = [Confirmed(c, PROXY, gap) for c, gap in select_candidates(trials, cfg.confirm.top_k,
                                                                            cfg.confirm.decimals)]
        taken = {e.candidate.key(cfg.confirm.decimals) for e in entries}
        for candidate, role in base:
            if candidate.key(cfg.confirm.decimals) not in taken:
                signals = calibration.points[job_key(Job(candidate, cfg.proxy.num_images, cfg.seed))]
                entries.append(Confirmed(candidate, role, calibration.gaps(signals)[objective]))
        run_confirm(confirm_study, pool, entries, cfg.confirm, cfg.seed, tracker)
    finally:
        pool.close()
    rho = spearman([e.gap for e in entries], [e.small["fid"] if e.small else math.nan for e in entries])
    best = best_of(entries)
    best_path, files = write_outputs(cfg, entries, best, rho, trials, calibration)
    c = best.candidate
    metrics = {"best_fid": best.fid, "best_gap": best.gap, "spearman_rho": rho}
    metrics.update({f"best_{k}": float(v) for k, v in c.as_dict().items() if v is not None})
    tracker.log_summary(metrics, {"guidetune.best": c.label(), "guidetune.best_role": best.role}, files)
    return best_path


USAGE = """usage: python -m pipeline.sweep [group=option ...] [key=value ...] [--cfg] [--help]

Find the best guidance (CFG weight w, IGG weight w', IGG window) for a scale-wise autoregressive backbone.
Rerunning with the same sweep.name resumes it. Common keys: sweep.name seed backbone guidance search.n_trials
search.sampler proxy.num_images confirm.top_k confirm.num_images confirm.reference launcher.workers
launcher.address tracking.uri storage.  --cfg prints the composed configuration and exits.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        groups = "\n".join(f"  {g}: {', '.join(group_options(g, CONF_DIR))}" for g in GROUPS)
        print(f"{USAGE}\ngroups:\n{groups}")
        return 0
    overrides = [a for a in args if a != "--cfg"]
    try:
        if "--cfg" in args:
            print(OmegaConf.to_yaml(compose_config(overrides), resolve=True), end="")
            return 0
        cfg = load_config(overrides)
        check_backbone(cfg)
        check_resume(cfg)
        if cfg.launcher.address is not None:  # a cluster that does not answer fails fast, before the reference
            connect(cfg.launcher)
        reference = fid_reference(cfg)
        started_ray = connect(cfg.launcher)  # a local Ray starts only once everything else checked out
    except (ValueError, ConnectionError) as err:  # bad config, checkpoint, reference or Ray address: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        check_capacity(cfg.launcher)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        best_path = run(cfg, reference)
    except (ConfigError, ClusterLostError) as err:  # actors the cluster cannot place or start; no node left
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            ray.shutdown()
    print(f"best: {best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
