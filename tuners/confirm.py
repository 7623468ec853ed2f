"""Stage 3 (confirm): race the finalists at growing N; FID decides, and says how sure it is.

The finalists (each kind's best refined candidate by smoothed FID, then each other refinement region's best,
then the next best, plus the backbone's published default CFG) are scored at every rung N of ``confirm.rungs``.
A rung extends each finalist's images (its labels and sampler seeds: the first N images at a larger N are the same
images), so a rung costs only the images it adds. After each rung the finalist with the lowest FID is the current
best; every other finalist whose FID exceeds it beyond noise (the lower end of the bootstrap interval of the
difference is above 0) leaves. As a cost cap, at most a ``confirm.keep`` share of the rest go on to the next
rung, and at most ``confirm.final_max`` to the last: the best of each refinement region first, then the lowest FIDs;
a finalist cut by the cap is reported as such, not as worse.

The last rung decides. With ``confirm.holdout`` it decides on the images it adds, which no stage has seen: the images
that chose a finalist (the screen's, the refinement's, the earlier rungs') flatter it, the more so the more
candidates they were chosen from (the winner's curse), so the winner's FID and the margin are measured on those
hold-out images alone. When a rung leaves one finalist (every other one worse beyond noise), the race is decided
(``confirm.stop_when_decided``): the winner goes straight to the last rung for its hold-out FID, or, without
``confirm.holdout``, stops there with its FID at that N. Every FID carries its interval; the result names the
runner-up and the margin, and whether the winner is separated from it. Each (finalist, rung) is one trial of the
``confirm`` ledger study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna

from pipeline.config.schema import BackboneConfig, ConfirmConfig
from tuners.jobs import Job, Observer, Pool
from tuners.scoring import Difference, FeatureBank, FidScore, Scorer, heads_first, scored_record
from tuners.space import Candidate
from tuners.studies import Ledger, job_key

REFINED, DEFAULT = "refined", "default"


def default_candidate(backbone: BackboneConfig) -> Candidate:
    """The backbone's published guidance: CFG at `backbone.default_cfg`."""
    return Candidate(w_cfg=backbone.default_cfg, w_igg=None, window=None)


@dataclass
class Racer:
    """One finalist: where it came from, its metrics at each rung it reached, and why it left (if it did)."""

    candidate: Candidate
    role: str  # refined | default
    refine_fid: float | None = None  # its FID in the refinement stage (refine.num_images)
    refine_smoothed: float | None = None  # and its smoothed FID there (tuners.surrogate), which chose it
    region: str = DEFAULT  # the refinement region (<kind>-<i>) it comes from; the published default its own
    scores: dict[int, FidScore] = field(default_factory=dict)  # N -> its FID there (its images 0..N-1)
    holdout: Holdout | None = None  # the last rung's FID on the images it added (confirm.holdout)
    left: str | None = None  # "worse at N=…", "cut at N=…" (cost cap) or a failure

    @property
    def reached(self) -> int:
        return max(self.scores, default=0)

    @property
    def final(self) -> FidScore:
        """The FID that decides and is reported: on its hold-out images when it has them, else at the highest N."""
        return self.holdout.score if self.holdout is not None else self.scores[self.reached]

    @property
    def fid(self) -> float:
        """:attr:`final`'s FID (NaN if none)."""
        return self.final.fid if self.scores else math.nan


@dataclass(frozen=True)
class Holdout:
    """The FID of a finalist's images start..end-1: those the last rung added, which no earlier stage saw."""

    start: int
    end: int
    score: FidScore

    @property
    def num_images(self) -> int:
        return self.end - self.start


@dataclass
class Margin:
    """FID(runner-up) − FID(winner) on the same image indices start..start+num_images-1 (start 0: their first N
    images; > 0: the hold-out images), with its interval; separated when low > 0."""

    runner_up: Racer
    num_images: int
    diff: float
    low: float
    high: float
    start: int = 0

    @property
    def separated(self) -> bool:
        return self.low > 0

    @property
    def runner_up_score(self) -> FidScore:
        """The runner-up's FID on the images compared: its hold-out score, or its FID at N."""
        return self.runner_up.final if self.start else self.runner_up.scores[self.num_images]


@dataclass
class RaceResult:
    """The race's answer: the winner, its margin over the runner-up (None when nothing else was scored), and every
    finalist with its scores and how it left."""

    winner: Racer
    margin: Margin | None
    racers: list[Racer]


@dataclass
class RaceStage:
    """The race of one sweep. Call :meth:`run`; it returns the winner and its margin over the runner-up."""

    study: optuna.Study
    racers: list[Racer]
    confirm: ConfirmConfig
    observer: Observer
    bank: FeatureBank
    scorer: Scorer
    eliminations: list[tuple[Racer, int, Difference]] = field(default_factory=list)
    decided_at: int | None = None  # the rung after which one finalist was left (confirm.stop_when_decided)

    def _job(self, racer: Racer, num_images: int) -> Job:
        start = self.bank.start_for(racer.candidate, num_images, self.scorer.layers)
        return Job(racer.candidate, num_images, self.bank.seed_of(racer.candidate), fid=True, start=start)

    def _finish(self, last: bool):
        return lambda job, done: scored_record("confirm", job, done, self.bank, self.scorer, all_metrics=last)

    def run(self, pool: Pool) -> RaceResult:
        alive = list(self.racers)
        rungs = self.confirm.rungs
        for r, n in enumerate(rungs):
            last = r == len(rungs) - 1
            if self.decided_at is not None and not last:
                continue  # decided: the lone finalist goes straight to its hold-out images
            jobs = {job_key(j): (j, racer) for racer in alive for j in [self._job(racer, n)]}
            done = Ledger(self.study, "confirm", {k: j for k, (j, _) in jobs.items()}, self._finish(last),
                          self.observer).run(pool)
            for key, (_, racer) in jobs.items():
                if key in done:
                    racer.scores[n] = FidScore.of(done[key].metrics)
                else:
                    racer.left = f"failed at N={n}"
            if last and self.confirm.holdout:
                # one block for all: from the furthest any finalist had seen (a published default may have none)
                start = max(job.start for job, _ in jobs.values())
                for racer in (racer for _, racer in jobs.values() if n in racer.scores):
                    held = self.bank.get(racer.candidate, n, self.scorer.layers, start)
                    racer.holdout = Holdout(start, n, self.scorer.fid(held, start=start))
            alive = [racer for racer in alive if n in racer.scores]
            if not alive:
                raise RuntimeError("no finalist was scored; see the failed confirm runs in MLflow, then rerun")
            if last:
                break
            alive = self._eliminate(alive, n)
            if len(alive) == 1 and self.confirm.stop_when_decided:
                self.decided_at = n  # every other finalist is worse beyond noise: more images change nothing
                if self.confirm.holdout:
                    continue
                [winner] = alive  # its every metric (the last rung's scoring), from the features it has
                winner.scores[n] = self.scorer.fid(self.bank.get(winner.candidate, n, self.scorer.layers),
                                                   all_metrics=True)
                break
            alive = self._capped(alive, n, self.confirm.final_max if r == len(rungs) - 2 else max(
                self.confirm.final_max, math.ceil(self.confirm.keep * len(alive))))
        winner = min(alive, key=lambda x: x.fid)
        return RaceResult(winner, self._margin(winner), self.racers)

    def _capped(self, alive: list[Racer], n: int, cap: int) -> list[Racer]:
        """The cost cap: the best finalist of each region first (lowest FID at N), then the rest by FID; the first
        `cap` go on. Two regions' bests are seldom separated at the N of a cut, and two points of one region are
        nearly one point: a second from one region would push out the only one of another."""
        ordered = heads_first(sorted(alive, key=lambda x: x.scores[n].fid), lambda x: x.region)
        for racer in ordered[cap:]:
            racer.left = f"cut at N={n} by the cost cap (not separated)"
        return ordered[:cap]

    def _eliminate(self, alive: list[Racer], n: int) -> list[Racer]:
        best = min(alive, key=lambda x: x.scores[n].fid)
        best_features = self.bank.get(best.candidate, n, self.scorer.layers)
        kept = []
        for racer in alive:
            if racer is best:
                kept.append(racer)
                continue
            diff = self.scorer.difference(self.bank.get(racer.candidate, n, self.scorer.layers), best_features)
            if diff.low > 0:
                racer.left = f"worse at N={n}: +{diff.diff:.3g} FID [{diff.low:.3g}, {diff.high:.3g}]"
                self.eliminations.append((racer, n, diff))
            else:
                kept.append(racer)
        return kept

    def _margin(self, winner: Racer) -> Margin | None:
        """The runner-up: the next lowest FID at the highest N it shares with the winner, on their hold-out images
        when both have the same ones."""
        others = [x for x in self.racers if x is not winner and x.scores]
        if not others:
            return None
        runner = min(others, key=lambda x: (-x.reached, x.fid))
        n = runner.reached
        held = (runner.holdout is not None and winner.holdout is not None
                and runner.holdout.start == winner.holdout.start and runner.holdout.end == winner.holdout.end)
        start = runner.holdout.start if held else 0
        diff = self.scorer.difference(self.bank.get(runner.candidate, n, self.scorer.layers, start),
                                      self.bank.get(winner.candidate, n, self.scorer.layers, start), start=start)
        return Margin(runner, n - start, diff.diff, diff.low, diff.high, start)
