"""What a finished sweep writes: best.yaml (the typed record of pipeline.outputs.report), report.md, the plots, and the
summary of the parent run in MLflow (metrics, tags, files, tables). Called once by pipeline.sweep after the race."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from pipeline.backbones.infinity import InfinityArgs, infinity_args
from pipeline.backbones.load import checkpoint_keys
from pipeline.config.schema import SweepConfig
from pipeline.core.guidance import KINDS
from pipeline.core.render import signals_vs_weight_png
from pipeline.core.sampling import Sampling as SweepSampling
from pipeline.data.files import atomic_write
from pipeline.fid.fidelity import file_digest
from pipeline.outputs.best import (
    BasinRecord,
    Best,
    Checkpoint,
    Cost,
    Default,
    MarginRecord,
    RhoRecord,
    Sampling,
    Scored,
    Versus,
    write_best,
)
from pipeline.outputs.report import (
    curves_png,
    race_table,
    report_markdown,
    screen_curves,
    screen_table,
)
from pipeline.runtime.tracking import Tracker
from tuners.confirm import DEFAULT, REFINED, Margin, Racer, RaceResult
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, TrialRecord
from tuners.proxy import ProxyResult
from tuners.scoring import Difference, FeatureBank, FidScore, Scorer, candidate_seed, direction
from tuners.screen import ScreenResult
from tuners.space import Candidate, Ranges

RACE_TABLE = "confirm_race.json"  # the race as an MLflow table on the parent run
SCREEN_TABLE = "screen_curves.json"  # every screened point (the FID curves) as an MLflow table


def costs(records: dict[str, list[TrialRecord]]) -> dict[str, Cost]:
    """Per stage: trials, images sampled and worker seconds of its finished trials; and the total."""
    out = {stage: Cost(len(recs), sum(r.images for r in recs), round(sum(r.worker_s for r in recs), 2))
           for stage, recs in records.items()}
    out["total"] = Cost(*(sum(getattr(c, k) for c in out.values()) for k in ("trials", "images", "worker_s")))
    return out


def official_args(cfg: SweepConfig, c: Candidate) -> InfinityArgs | None:
    """An Infinity winner without an IGG term as the official sampler's arguments; None otherwise."""
    if cfg.backbone.kind != "infinity" or c.w_igg is not None:
        return None
    b, K = cfg.backbone, len(cfg.backbone.patch_nums)
    return infinity_args(c.w_cfg, SweepSampling.of(cfg).guiding(c.interval).ratios(K),
                         b.tau * K if len(b.tau) == 1 else b.tau, top_k=b.top_k, top_p=b.top_p,
                         negative_prompt=b.negative_prompt)


def answer(cfg: SweepConfig, winner: Racer, margin: Margin | None, racers: list[Racer], ranges: Ranges,
           cost: dict[str, Cost], screen: ScreenResult, igg_vs_cfg: Versus | None) -> Best:
    """best.yaml of a finished race."""
    scores, held = winner.final, winner.holdout
    n = winner.reached if held is None else held.num_images
    c = winner.candidate

    def scored(r: Racer, score: FidScore, m: int) -> dict:
        return {**r.candidate.as_dict(), "kind": r.candidate.kind, "num_images": m,
                "fid": score.fid, "fid_low": score.fid_low, "fid_high": score.fid_high}

    default = next((r for r in racers if r.role == DEFAULT and r.scores), None)
    gain = None if default is None or default.reached not in winner.scores else (
        default.scores[default.reached].fid - winner.scores[default.reached].fid)
    return Best(
        backbone=cfg.backbone.name, guidance=cfg.guidance.name, kind=c.kind, w_cfg=c.w_cfg, w_igg=c.w_igg,
        window=c.window, fid=scores.fid, fid_low=scores.fid_low, fid_high=scores.fid_high, num_images=n,
        at_bound=ranges.bounds(c),
        runner_up=None if margin is None else Scored(**scored(margin.runner_up, margin.runner_up_score,
                                                              margin.num_images)),
        margin=None if margin is None else MarginRecord(margin.diff, margin.low, margin.high, margin.num_images,
                                                        margin.separated, margin.start),
        default=None if default is None else Default(**scored(default, default.scores[default.reached],
                                                              default.reached), gain=gain),
        cost=cost,
        interval=(list(c.interval) if c.interval is not None else None if cfg.search.intervals is None
                  else [cfg.guidance.schedule_start, cfg.guidance.schedule_end]),  # a default CFG: the sweep's own
        clip_score=scores.clip_score,
        sampling=Sampling(
            schedule=cfg.guidance.schedule,
            schedule_start=cfg.guidance.schedule_start if c.interval is None else c.interval[0],
            schedule_end=cfg.guidance.schedule_end if c.interval is None else c.interval[1],
            top_k=cfg.backbone.top_k, top_p=cfg.backbone.top_p,
            seed=candidate_seed(cfg.seed, c, common=cfg.refine.common_seeds), sweep_seed=cfg.seed,
            batch_size=cfg.confirm.batch_size, level=cfg.confirm.level,
            bootstrap=f"{cfg.confirm.bootstrap} resamples, "
                      + ("inside each condition" if cfg.confirm.stratify else "over all images"),
            patch_nums=list(cfg.backbone.patch_nums), last_scale_temp=cfg.backbone.last_scale_temp,
            drop_uncond=cfg.backbone.drop_uncond, tau=list(cfg.backbone.tau),
            negative_prompt=cfg.backbone.negative_prompt, prompts=cfg.backbone.prompts,
            labels=("image i: class i*P mod C (pipeline.core.sampling.spread_labels)"
                    if cfg.backbone.kind == "var"
                    else f"image i: prompt i*P mod N of {cfg.backbone.prompts} "
                         "(pipeline.core.sampling.spread_prompts)"),
            batch_seeds="derive_seed(seed, batch index) (pipeline.core.seeds); seed: the winner's "
                        "(tuners.scoring.candidate_seed of sweep_seed)"),
        checkpoints={key: Checkpoint(getattr(cfg.backbone, key), file_digest(getattr(cfg.backbone, key)))
                     for key in checkpoint_keys(cfg.backbone)},
        basins=[BasinRecord(curve=b.point.curve.label(), kind=b.point.curve.kind, **b.point.candidate.as_dict(),
                            num_images=screen.num_images, fid=b.point.scores[screen.num_images].fid,
                            smoothed=b.smoothed, refined=b in screen.refined,
                            worse=b.worse) for b in screen.basins],
        versus=igg_vs_cfg,
        proxy_rho=None if screen.rho is None else RhoRecord(**asdict(screen.rho)),
        curves=screen_curves(screen),
        official=official_args(cfg, c),
        holdout_from=None if held is None else held.start,
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


def versus_verdict(diff: Difference) -> str:
    """One line on FID(CFG) − FID(IGG) with its interval: which guidance is better on this backbone, or neither."""
    span = f"FID(CFG) - FID(IGG) = {diff.diff:+.3g} [{diff.low:+.3g}, {diff.high:+.3g}]"
    return {1: f"IGG beats CFG on this backbone: {span}", -1: f"CFG beats IGG on this backbone: {span}",
            0: f"IGG and CFG are not separated on this backbone: {span} includes 0"}[direction(diff.low, diff.high)]


def screened_ranges(kinds: list[str], cfg: SweepConfig) -> Ranges:
    """The ranges the answer is judged against: every weight of every kind screened from refine.min_weight (low)
    to search.max_weight (cap)."""
    ranges = Ranges.start(kinds, cfg.search)
    for spans in ranges.spans.values():
        for span in spans.values():
            span[:] = [cfg.refine.min_weight, cfg.search.max_weight]
    return ranges


def versus(racers: list[Racer], screen: ScreenResult, bank: FeatureBank, scorer: Scorer) -> Versus | None:
    """IGG against CFG (None unless the sweep has both kinds): FID(CFG's best) − FID(IGG's best) on the most images
    both have, with its interval. A kind's best is its best refined finalist (most images, then lowest FID; the
    published default CFG is not CFG's best), else its best screened point."""
    best: dict[str, tuple[Candidate, int]] = {}
    for kind in ("cfg", "igg"):
        mine = [r for r in racers if r.candidate.kind == kind and r.scores and r.role == REFINED]
        if mine:
            r = min(mine, key=lambda r: (-r.reached, r.fid))
            best[kind] = (r.candidate, r.reached)
        elif (p := screen.best_of(kind)) is not None:
            best[kind] = (p.candidate, screen.num_images)
    if len(best) < 2:  # a sweep without both kinds
        return None
    n = min(m for _, m in best.values())
    layers = scorer.layers
    features = {k: bank.get(c, n, layers) for k, (c, _) in best.items()}
    diff = scorer.difference(features["cfg"], features["igg"])
    fid = {k: scorer.fid(f).fid for k, f in features.items()}
    return Versus(diff.diff, diff.low, diff.high, cfg=best["cfg"][0].label(), igg=best["igg"][0].label(),
                  num_images=n, fid_cfg=fid["cfg"], fid_igg=fid["igg"], verdict=versus_verdict(diff))




def publish(cfg: SweepConfig, proxy: ProxyResult, screen: ScreenResult, race: RaceResult,
            records: dict[str, list[TrialRecord]], igg_vs_cfg: Versus | None, tracker: Tracker) -> Path:
    """best.yaml, report.md and the plots, then the parent run's summary in MLflow; the path of best.yaml.

    `records`: every finished trial by study stage (proxy, screen, refine/<region>, confirm), for the cost.
    """
    kinds = list(cfg.guidance.kinds)
    winner, margin, racers = race.winner, race.margin, race.racers
    cost = costs({"proxy": records["proxy"], "screen": records["screen"],
                  "refine": [r for stage, rs in records.items() if stage.startswith("refine/") for r in rs
                             if r.stage == "refine"],
                  "confirm": records["confirm"]})
    best = answer(cfg, winner, margin, racers, screened_ranges(kinds, cfg), cost, screen, igg_vs_cfg)
    best_path, files = write_outputs(cfg, best, racers, winner, margin, proxy, screen)
    capped = [w for w, where in best.at_bound.items() if where == "cap"]
    if capped:
        print(f"warning: the answer's {', '.join(capped)} sits at search.max_weight={cfg.search.max_weight}; "
              "raise it to look further", file=sys.stderr)
    c = winner.candidate
    metrics = {"best_fid": best.fid, "best_fid_low": best.fid_low, "best_fid_high": best.fid_high,
               **({f"best_clip_score_{k}": v for k, v in asdict(best.clip_score).items()} if best.clip_score else {}),
               **({f"proxy_rho_{k}": float(v) for k, v in asdict(best.proxy_rho).items()} if best.proxy_rho else {}),
               **{f"cost_{stage}_{k}": float(v) for stage, cs in cost.items() for k, v in asdict(cs).items()}}
    metrics.update({f"best_{k}": float(v) for k, v in c.as_dict().items() if v is not None and k != "interval"})
    if margin is not None:
        metrics.update({"margin": margin.diff, "margin_low": margin.low, "margin_high": margin.high})
    tags = {"guidetune.best": c.label(), "guidetune.best_kind": c.kind,
            "guidetune.separated": str(margin.separated if margin else None)}
    tracker.log_summary(metrics, tags, files, {RACE_TABLE: race_table(racers, winner),
                                                    SCREEN_TABLE: screen_table(screen)})
    return best_path

