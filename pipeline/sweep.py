"""Entry point: ``python -m pipeline.sweep [-m] [group=option] [key=value ...]``, a Hydra app on conf/sweep.yaml.

Each run, and each job of ``-m`` (a multirun), is one sweep. Order of work, so that bad input touches nothing:
before Hydra starts, compose and validate every job's config, load the checkpoints once to check them, check a
resumed sweep has the same settings, reach the Ray cluster if one is named (bounded wait) and compute the FID
reference statistics (cached); then Hydra runs the jobs: start a local Ray if none is named, and only then create
the MLflow and Optuna stores and start the actors. Stages: proxy (gap, every kind, ranges that grow) -> refine
(low-N FID, a trust region per kind) -> confirm (a race at growing N with paired-bootstrap intervals) -> report. The
last line of a sweep is ``best: <path to best.yaml>``; after the jobs of -m, pipeline.callbacks writes the summary.
Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import optuna
import ray
import torch
from omegaconf import DictConfig

from pipeline.app import job_overrides, parse_args, run_app
from pipeline.backbones.load import checkpoint_keys, load_backbone, num_conditions
from pipeline.config import (
    CONF_DIR,
    GROUPS,
    ConfigError,
    SweepConfig,
    as_dict,
    compose_config,
    load_config,
    sqlite_path,
    store_lock,
    validated,
)
from pipeline.distributed import ClusterLostError, RayPool, check_capacity, connect
from pipeline.fid import FidEvaluator, Reference, file_digest, reference_source
from pipeline.files import atomic_write
from pipeline.guidance import KINDS
from pipeline.report import (
    Best,
    curves_png,
    race_table,
    report_markdown,
    screen_curves,
    screen_table,
    signals_vs_weight_png,
    write_best,
)
from pipeline.tracking import Tracker
from tuners.confirm import DEFAULT, REFINED, Margin, Racer, RaceResult, RaceStage, default_candidate
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, TrialRecord
from tuners.proxy import ProxyResult, ProxyStage, gap_name
from tuners.refine import RefineResult, RefineStage, Start
from tuners.scoring import FeatureBank, Scorer, candidate_seed
from tuners.screen import ScreenResult, ScreenStage, curves_of, total, totals
from tuners.space import Candidate, Ranges
from tuners.studies import counts_toward_budget, open_study, record_of, study_name

RACE_TABLE = "confirm_race.json"  # the race as an MLflow table on the parent run
SCREEN_TABLE = "screen_curves.json"  # every screened point (the FID curves) as an MLflow table
SETTINGS_ATTR = "settings"  # proxy-study user attr: the settings a resumed sweep must keep
STAGES = ("proxy", "screen", "confirm")  # plus one refine/<kind>-<i> study per refined basin (open_studies)


def open_studies(cfg: SweepConfig) -> dict[str, optuna.Study]:
    """The sweep's Optuna studies by stage: proxy, screen, confirm, and every refine/<region> the storage holds."""
    studies = {stage: open_study(cfg.storage, study_name(cfg.sweep.name, stage)) for stage in STAGES}
    prefix = study_name(cfg.sweep.name, "refine/")
    for name in sorted(n for n in optuna.get_all_study_names(cfg.storage) if n.startswith(prefix)):
        studies[name[len(study_name(cfg.sweep.name, "")):]] = open_study(cfg.storage, name)
    return studies


def resume_settings(cfg: SweepConfig) -> dict[str, Any]:
    """The settings that define a sweep's trials; rerunning a sweep name with other values is refused."""
    search = {k: v for k, v in asdict(cfg.search).items() if k != "n_trials"}
    return {"seed": cfg.seed, "backbone": asdict(cfg.backbone), "guidance": asdict(cfg.guidance), "search": search,
            "proxy": asdict(cfg.proxy), "screen": asdict(cfg.screen), "refine": asdict(cfg.refine),
            "confirm": asdict(cfg.confirm),
            "workers": cfg.launcher.workers}


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
    # A weights file torch.load(weights_only=True) refuses raises one ValueError naming it (pipeline.files).
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


def costs(records: dict[str, list[TrialRecord]]) -> dict[str, dict[str, float]]:
    """Per stage: trials, images sampled and worker seconds of its finished trials; and the total."""
    out = {stage: {"trials": len(recs), "images": sum(r.images for r in recs),
                   "worker_s": round(sum(r.worker_s for r in recs), 2)} for stage, recs in records.items()}
    out["total"] = {k: sum(c[k] for c in out.values()) for k in ("trials", "images", "worker_s")}
    return out


def answer(cfg: SweepConfig, winner: Racer, margin: Margin | None, racers: list[Racer], ranges: Ranges,
           cost: dict, screen: ScreenResult, versus: dict | None) -> Best:
    """best.yaml of a finished race."""
    n = winner.reached
    scores = winner.scores[n]
    c = winner.candidate

    def scored(r: Racer, m: int) -> dict:
        return {**r.candidate.as_dict(), "kind": r.candidate.kind, "num_images": m,
                **{k: r.scores[m][k] for k in ("fid", "fid_low", "fid_high")}}

    default = next((r for r in racers if r.role == DEFAULT), None)
    default_out = None
    if default is not None and default.scores:
        m = default.reached
        default_out = {**scored(default, m), "gain": default.scores[m]["fid"] - winner.scores[m]["fid"]
                       if m in winner.scores else None}
    return Best(
        backbone=cfg.backbone.name, guidance=cfg.guidance.name, kind=c.kind, w_cfg=c.w_cfg, w_igg=c.w_igg,
        window=c.window, fid=scores["fid"], fid_low=scores["fid_low"], fid_high=scores["fid_high"], num_images=n,
        at_bound=ranges.bounds(c),
        runner_up=scored(margin.runner_up, margin.num_images) if margin else None,
        margin=None if margin is None else {"diff": margin.diff, "low": margin.low, "high": margin.high,
                                            "num_images": margin.num_images, "separated": margin.separated},
        default=default_out, cost=cost,
        interval=(list(c.interval) if c.interval is not None else None if cfg.search.intervals is None
                  else [cfg.guidance.schedule_start, cfg.guidance.schedule_end]),  # a default CFG: the sweep's own
        clip_score={"value": scores["clip_score"], "low": scores["clip_score_low"],
                    "high": scores["clip_score_high"]} if "clip_score" in scores else None,
        sampling={"schedule": cfg.guidance.schedule,
                  "schedule_start": cfg.guidance.schedule_start if c.interval is None else c.interval[0],
                  "schedule_end": cfg.guidance.schedule_end if c.interval is None else c.interval[1],
                  "top_k": cfg.backbone.top_k, "top_p": cfg.backbone.top_p,
                  "seed": candidate_seed(cfg.seed, c, common=cfg.refine.common_seeds), "sweep_seed": cfg.seed,
                  "batch_size": cfg.confirm.batch_size, "level": cfg.confirm.level,
                  "bootstrap": f"{cfg.confirm.bootstrap} resamples, "
                               + ("inside each condition" if cfg.confirm.stratify else "over all images"),
                  "patch_nums": list(cfg.backbone.patch_nums),
                  "last_scale_temp": cfg.backbone.last_scale_temp, "drop_uncond": cfg.backbone.drop_uncond,
                  "labels": ("image i: class i*P mod C (pipeline.sampling.spread_labels)" if cfg.backbone.kind == "var"
                             else f"image i: prompt i*P mod N of {cfg.backbone.prompts} "
                                  "(pipeline.sampling.spread_prompts)"),
                  "batch_seeds": "derive_seed(seed, batch index) (tuners.samplers); seed: the winner's "
                                 "(tuners.scoring.candidate_seed of sweep_seed)"},
        checkpoints={key: {"path": getattr(cfg.backbone, key), "sha256": file_digest(getattr(cfg.backbone, key))}
                     for key in checkpoint_keys(cfg.backbone)},
        basins=[{"curve": b.point.curve.label(), **b.point.candidate.as_dict(), "kind": b.point.curve.kind,
                 "num_images": screen.num_images, "fid": b.point.scores[screen.num_images]["fid"],
                 "smoothed": b.smoothed, "refined": b in screen.refined,
                 "worse": None if b.worse is None else dict(b.worse)} for b in screen.basins],
        versus=versus,
        proxy_rho=None if screen.rho is None else asdict(screen.rho),
        curves=screen_curves(screen),
    )


def write_outputs(cfg: SweepConfig, best: Best, racers: list[Racer], winner: Racer, margin: Margin | None,
                  proxy: ProxyResult, screen: ScreenResult) -> tuple[Path, list[Path]]:
    """best.yaml, report.md and the plots in sweep.output_dir; returns (best.yaml, all files)."""
    out = Path(cfg.sweep.output_dir)
    best_path = write_best(out / "best.yaml", best)
    markdown = report_markdown(f"guidetune sweep {cfg.sweep.name}", racers, winner, margin, best, screen)
    files = [best_path, atomic_write(out / "report.md", markdown.encode()),
             atomic_write(out / "curves.png", curves_png(screen, winner.candidate))]
    if proxy.records:
        e_name, d_name = EVENNESS_SIGNAL[cfg.proxy.evenness], DIVERGENCE_SIGNAL[cfg.proxy.reference]
        for kind in cfg.guidance.kinds:
            weight = KINDS[kind].weights[-1]
            rows = [(getattr(c, weight), r.signals[e_name], r.signals[d_name]) for c, r in proxy.records
                    if c.kind == kind]
            if rows:
                files.append(atomic_write(out / f"proxy_signals_{kind}.png", signals_vs_weight_png(weight, rows)))
    return best_path, files


def run(cfg: SweepConfig, evaluator: FidEvaluator, reference: Reference) -> Path:
    """Run (or resume) the sweep of a validated config on a connected Ray; returns the path of best.yaml."""
    e_name, d_name = EVENNESS_SIGNAL[cfg.proxy.evenness], DIVERGENCE_SIGNAL[cfg.proxy.reference]
    studies = open_studies(cfg)
    kept = {(stage, t.number) for stage, s in studies.items() for t in s.get_trials(deepcopy=False)
            if counts_toward_budget(t)}
    tracker = Tracker(cfg.tracking.uri, cfg.sweep.name, (e_name, d_name))
    tracker.open_parent(as_dict(cfg), kept)  # runs of trials a dead driver left unfinished become KILLED
    status = "FAILED"
    try:
        best_path = Sweep(cfg, evaluator, reference, tracker, studies).run()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
    return best_path


class Sweep:
    """The stages of one sweep over one pool of actors, each built from the last one's result: proxy -> screen ->
    refine -> race; then the outputs."""

    def __init__(self, cfg: SweepConfig, evaluator: FidEvaluator, reference: Reference, tracker: Tracker,
                 studies: dict):
        self.cfg, self.tracker, self.studies = cfg, tracker, studies
        bank_dir = Path(cfg.sweep.output_dir) / "features"
        self.bank = FeatureBank(bank_dir, sorted({0, *cfg.screen.rungs, cfg.refine.num_images, *cfg.confirm.rungs}),
                                cfg.seed, cfg.refine.common_seeds)
        self.scorer = Scorer(evaluator, reference, cfg.confirm.bootstrap, cfg.confirm.level, cfg.seed,
                             num_conditions(cfg.backbone) if cfg.confirm.stratify else None,
                             clip=cfg.confirm.clip_weights is not None)
        self.reference = reference

    def run(self) -> Path:
        cfg = self.cfg
        self.studies["proxy"].set_user_attr(SETTINGS_ATTR, resume_settings(cfg))
        pool = RayPool(cfg, self.reference)
        results: list[Any] = []
        try:
            for stage in (self._proxy, self._screen, self._refine, self._race):  # each built from the last result
                results.append(stage(results[-1] if results else None).run(pool))
        finally:
            pool.close()
        proxy, screen, _, race = results
        return self._outputs(proxy, screen, race)

    def _proxy(self, _: None) -> ProxyStage:
        cfg = self.cfg
        return ProxyStage(self.studies["proxy"], list(cfg.guidance.kinds), cfg.search, cfg.proxy, cfg.seed,
                          self.tracker, cfg.confirm.decimals)

    def _screen(self, proxy: ProxyResult) -> ScreenStage:
        """The global stage over [refine.min_weight, search.max_weight]; the proxy's pick of each kind is one more
        point on its curves."""
        cfg = self.cfg
        floor, cap = cfg.refine.min_weight, cfg.search.max_weight
        return ScreenStage(self.studies["screen"], curves_of(list(cfg.guidance.kinds), cfg.search.windows,
                                                             cfg.screen.shares, cfg.search.interval_choices()),
                           totals(cfg.screen.points, floor, cap), [c for c in proxy.picks if floor <= total(c) <= cap],
                           cfg.screen, cfg.refine.lengthscale, gap_name(cfg.proxy.evenness, cfg.proxy.reference),
                           self.tracker, self.bank, self.scorer)

    def _refine(self, screen: ScreenResult) -> RefineStage:
        """A trust region per basin the screen kept, each with its study refine/<kind>-<i>."""
        cfg = self.cfg
        starts = self._starts(screen)
        for name in starts:
            self.studies[f"refine/{name}"] = open_study(cfg.storage, study_name(cfg.sweep.name, f"refine/{name}"))
        return RefineStage({name: self.studies[f"refine/{name}"] for name in starts}, starts, cfg.refine, cfg.search,
                           cfg.seed, self.tracker, self.bank, self.scorer)

    def _race(self, refine: RefineResult) -> RaceStage:
        """The refinement's finalists and the backbone's published CFG (unless it is one of them)."""
        cfg = self.cfg
        racers = [Racer(c, REFINED, refine_fid=rec.value, refine_smoothed=smoothed)
                  for c, rec, smoothed in refine.finalists(cfg.confirm.finalists, cfg.confirm.decimals,
                                                           cfg.confirm.separation)]
        default = default_candidate(cfg.backbone)
        if all(r.candidate.key(cfg.confirm.decimals) != default.key(cfg.confirm.decimals) for r in racers):
            racers.append(Racer(default, DEFAULT))
        return RaceStage(self.studies["confirm"], racers, cfg.confirm, self.tracker, self.bank, self.scorer)

    def _outputs(self, proxy: ProxyResult, screen: ScreenResult, race: RaceResult) -> Path:
        """best.yaml, report.md and the plots, then the parent run's summary in MLflow; the path of best.yaml."""
        cfg, kinds = self.cfg, list(self.cfg.guidance.kinds)
        winner, margin, racers = race.winner, race.margin, race.racers
        records = {stage: [record_of(t) for t in s.get_trials(deepcopy=False) if counts_toward_budget(t)]
                   for stage, s in self.studies.items()}
        cost = costs({"proxy": records["proxy"], "screen": records["screen"],
                      "refine": [r for stage, rs in records.items() if stage.startswith("refine/") for r in rs
                                 if r.stage == "refine"],
                      "confirm": records["confirm"]})
        versus = self._versus(racers, screen) if {"cfg", "igg"} <= set(kinds) else None
        best = answer(cfg, winner, margin, racers, screened_ranges(kinds, cfg), cost, screen, versus)
        best_path, files = write_outputs(cfg, best, racers, winner, margin, proxy, screen)
        capped = [w for w, where in best.at_bound.items() if where == "cap"]
        if capped:
            print(f"warning: the answer's {', '.join(capped)} sits at search.max_weight={cfg.search.max_weight}; "
                  "raise it to look further", file=sys.stderr)
        c = winner.candidate
        metrics = {"best_fid": best.fid, "best_fid_low": best.fid_low, "best_fid_high": best.fid_high,
                   **({f"best_clip_score_{k}": v for k, v in best.clip_score.items()} if best.clip_score else {}),
                   **({f"proxy_rho_{k}": float(v) for k, v in best.proxy_rho.items()} if best.proxy_rho else {}),
                   **{f"cost_{stage}_{k}": float(v) for stage, cs in cost.items() for k, v in cs.items()}}
        metrics.update({f"best_{k}": float(v) for k, v in c.as_dict().items() if v is not None and k != "interval"})
        if margin is not None:
            metrics.update({"margin": margin.diff, "margin_low": margin.low, "margin_high": margin.high})
        tags = {"guidetune.best": c.label(), "guidetune.best_kind": c.kind,
                "guidetune.separated": str(margin.separated if margin else None)}
        self.tracker.log_summary(metrics, tags, files, {RACE_TABLE: race_table(racers, winner),
                                                        SCREEN_TABLE: screen_table(screen)})
        return best_path

    def _starts(self, screen: ScreenResult) -> dict[str, Start]:
        """A trust region per refined basin (<kind>-<i>), its half-width the screen's spacing, seeded with the
        basin curve's points within that distance that reached refine.num_images."""
        starts: dict[str, Start] = {}
        for basin in screen.refined:
            curve, centre = basin.point.curve, math.log1p(basin.point.total)
            seeds = tuple(p.record for p in screen.points if p.curve == curve and p.record is not None
                          and p.reached == self.cfg.refine.num_images
                          and abs(math.log1p(p.total) - centre) <= screen.spacing * (1 + 1e-9))
            index = sum(name.startswith(f"{curve.kind}-") for name in starts)
            starts[f"{curve.kind}-{index}"] = Start(curve.kind, basin.point.candidate, screen.spacing, seeds)
        return starts

    def _versus(self, racers: list[Racer], screen: ScreenResult) -> dict | None:
        """IGG against CFG: FID(CFG's best) − FID(IGG's best) on the most images both have, with its interval.
        A kind's best is its best finalist (most images, then lowest FID), else its best screened point."""
        best: dict[str, tuple[Candidate, int]] = {}
        for kind in ("cfg", "igg"):
            mine = [r for r in racers if r.candidate.kind == kind and r.scores]
            if mine:
                r = min(mine, key=lambda r: (-r.reached, r.fid))
                best[kind] = (r.candidate, r.reached)
            elif (p := screen.best_of(kind)) is not None:
                best[kind] = (p.candidate, screen.num_images)
        if len(best) < 2:
            return None
        n = min(m for _, m in best.values())
        layers = self.scorer.layers
        features = {k: self.bank.get(c, n, layers) for k, (c, _) in best.items()}
        diff = self.scorer.difference(features["cfg"], features["igg"])
        fid = {k: self.scorer.fid(f)["fid"] for k, f in features.items()}
        return {"cfg": best["cfg"][0].label(), "igg": best["igg"][0].label(), "num_images": n, "fid_cfg": fid["cfg"],
                "fid_igg": fid["igg"], **diff, "verdict": versus_verdict(diff)}


def versus_verdict(diff: dict[str, float]) -> str:
    """One line on FID(CFG) − FID(IGG) with its interval: which guidance is better on this backbone, or neither."""
    span = f"{diff['diff']:+.3g} [{diff['low']:+.3g}, {diff['high']:+.3g}]"
    if diff["low"] > 0:
        return f"IGG beats CFG on this backbone: FID(CFG) - FID(IGG) = {span}"
    if diff["high"] < 0:
        return f"CFG beats IGG on this backbone: FID(CFG) - FID(IGG) = {span}"
    return f"IGG and CFG are not separated on this backbone: FID(CFG) - FID(IGG) = {span} includes 0"


def screened_ranges(kinds: list[str], cfg: SweepConfig) -> Ranges:
    """The ranges the answer is judged against: every weight of every kind screened from refine.min_weight (low)
    to search.max_weight (cap)."""
    ranges = Ranges.start(kinds, cfg.search)
    for spans in ranges.spans.values():
        for span in spans.values():
            span[:] = [cfg.refine.min_weight, cfg.search.max_weight]
    return ranges


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
    place the actors, and compute the FID reference statistics (cached under <root>/fid_cache, so the job reads
    them back). Raises ValueError (ConfigError) or ConnectionError, one line each.
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
        fid_reference(cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="sweep", version_base="1.3")
def sweep_job(job: DictConfig) -> str:
    """One sweep as a Hydra job (each job of -m is one sweep): run or resume it; returns the path of best.yaml.

    main() refused bad input before Hydra started; what can still fail here (a file changed since, a cluster that
    cannot place the actors or went away) is one line on stderr and exit code 2, as before the first trial.
    """
    try:
        cfg = validated(job)
        evaluator, reference = fid_reference(cfg)  # read back from the cache the checks filled
        connect(cfg.launcher)  # a local Ray starts only once everything else checked out
    except (ValueError, ConnectionError) as err:  # bad config, checkpoint, reference or Ray address: one line
        ray.shutdown()
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        check_capacity(cfg.launcher)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        best_path = run(cfg, evaluator, reference)
    except (ConfigError, ClusterLostError) as err:  # actors the cluster cannot place or start; no node left
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        ray.shutdown()  # a local Ray stops; a cluster only loses this driver (the next job of -m may want another)
    print(f"best: {best_path}")
    return str(best_path)


def main(argv: list[str] | None = None) -> int:
    """The command line (Hydra's flags and overrides): check every job, then hand it to Hydra; the exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse_args(args)
        if parsed.help or parsed.hydra_help or parsed.cfg is not None or parsed.info is not None:
            compose_config(list(parsed.overrides))  # a composition error is one line here, not Hydra's
        elif not parsed.shell_completion:  # whose "overrides" are its commands (install=bash, query=bash)
            preflight(job_overrides(parsed, CONF_DIR))
    except (ValueError, ConnectionError) as err:  # bad flag, override, config, checkpoint, reference or Ray address
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_app(sweep_job, args)


if __name__ == "__main__":
    sys.exit(main())
