"""Entry point: ``python -m pipeline.sweep [-m] [group=option] [key=value ...]``, a Hydra app on conf/sweep.yaml.

Each run, and each job of ``-m`` (a multirun), is one sweep: the checks (pipeline.preflight, for every job before
Hydra writes anything), then Hydra runs the jobs: a local Ray starts if none is named, and only then the MLflow and
Optuna stores are created and the actors start. The stages, each built from the last one's result: proxy (gap,
every kind, ranges that grow) -> screen (low-N FID of every kind over the whole range, successive halving, basins)
-> refine (a trust region per basin kept) -> race (growing N, paired-bootstrap intervals); then the outputs
(pipeline.outputs.publish). The last line of a sweep is ``best: <path to best.yaml>``; after the jobs of -m,
pipeline.callbacks writes the summary. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import hydra
import optuna
import ray
from omegaconf import DictConfig

from pipeline.backbones.load import num_conditions
from pipeline.config.schema import (
    CONF_DIR,
    ConfigError,
    SweepConfig,
    as_dict,
    compose_config,
    validated,
)
from pipeline.fid.fidelity import FidEvaluator, Reference
from pipeline.outputs.publish import publish, versus
from pipeline.preflight import SETTINGS_ATTR, checked, preflight, resume_settings
from pipeline.runtime.app import job_overrides, parse_args, run_app
from pipeline.runtime.distributed import ClusterLostError, RayPool, check_capacity, connect
from pipeline.runtime.tracking import Tracker
from tuners.confirm import DEFAULT, REFINED, Racer, RaceResult, RaceStage, default_candidate
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL
from tuners.proxy import ProxyResult, ProxyStage, gap_name
from tuners.refine import RefineResult, RefineStage, Start
from tuners.scoring import FeatureBank, Scorer
from tuners.screen import ScreenResult, ScreenStage, curves_of, total, totals
from tuners.studies import counts_toward_budget, open_study, record_of, study_name

STAGES = ("proxy", "screen", "confirm")  # plus one refine/<kind>-<i> study per refined basin (open_studies)


def open_studies(cfg: SweepConfig) -> dict[str, optuna.Study]:
    """The sweep's Optuna studies by stage: proxy, screen, confirm, and every refine/<region> the storage holds."""
    studies = {stage: open_study(cfg.storage, study_name(cfg.sweep.name, stage)) for stage in STAGES}
    prefix = study_name(cfg.sweep.name, "refine/")
    for name in sorted(n for n in optuna.get_all_study_names(cfg.storage) if n.startswith(prefix)):
        studies[name[len(study_name(cfg.sweep.name, "")):]] = open_study(cfg.storage, name)
    return studies


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
        racers = [Racer(r.candidate, REFINED, refine_fid=r.record.value, refine_smoothed=r.smoothed, region=r.region)
                  for r in refine.finalists(cfg.confirm.finalists, cfg.confirm.decimals, cfg.confirm.separation)]
        default = default_candidate(cfg.backbone)
        if all(r.candidate.key(cfg.confirm.decimals) != default.key(cfg.confirm.decimals) for r in racers):
            racers.append(Racer(default, DEFAULT))
        return RaceStage(self.studies["confirm"], racers, cfg.confirm, self.tracker, self.bank, self.scorer)

    def _outputs(self, proxy: ProxyResult, screen: ScreenResult, race: RaceResult) -> Path:
        """best.yaml, report.md and the plots, then the parent run's summary in MLflow; the path of best.yaml."""
        records = {stage: [record_of(t) for t in s.get_trials(deepcopy=False) if counts_toward_budget(t)]
                   for stage, s in self.studies.items()}
        return publish(self.cfg, proxy, screen, race, records, versus(race.racers, screen, self.bank, self.scorer),
                       self.tracker)

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


@hydra.main(config_path=str(CONF_DIR), config_name="sweep", version_base="1.3")
def sweep_job(job: DictConfig) -> str:
    """One sweep as a Hydra job (each job of -m is one sweep): run or resume it; returns the path of best.yaml.

    main() refused bad input before Hydra started; what can still fail here (a file changed since, a cluster that
    cannot place the actors or went away) is one line on stderr and exit code 2, as before the first trial.
    """
    try:
        cfg = validated(job)
        evaluator, reference = checked(cfg)  # what the checks computed
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
