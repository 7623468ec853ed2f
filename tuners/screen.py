"""The global stage (screen): every guidance kind over the whole allowed range at low-N FID, by successive halving.

A trust region finds the basin it starts in. A hump in the FID curve hides what lies beyond it (measured on the
embedded ``tiny_small``: CFG's FID rises from w≈3 to a peak at w≈6–8, then falls below its value at 3), and a region
whose best lies inside never grows past it. So before any trust region the screen scores every kind over
[``refine.min_weight``, ``search.max_weight``]:

- curves: CFG's w; IGG's w′ (one curve per window); mixed along rays w = (1 − s)·t, w′ = s·t, one per share s of
  ``screen.shares`` and window; each of them once per guidance interval when ``search.intervals`` is searched. A point
  of a curve is its total weight t (w, w′ or w + w′).
- points: ``screen.points`` totals evenly spaced in u = log(1 + t) from the floor to the cap (guidance acts
  multiplicatively: FID moves as much from w=3 to 6 as from 6 to 12), so every basin wider than the spacing holds a
  point wherever it lies; plus the proxy's pick on each curve (the proxy may add points, never remove any).
- rungs: every point is scored at ``screen.rungs[0]`` images; after each rung the best ``screen.keep`` share of each
  curve's points, each basin's best first, goes on to the next rung, whose jobs add images to the point's own
  (:class:`tuners.scoring.FeatureBank`), never redraw them.
- basins: at the first rung, where every point has the same N, a curve's FID is smoothed along u (the GP of
  :mod:`tuners.surrogate`); a basin is a local minimum of the smoothed curve, and every point belongs to the basin it
  descends to. After the last rung a basin's representative is its surviving point of lowest FID, and the basins are
  ranked by that FID: every survivor has the same N there, and smoothing, which finds the basins, would also lift a
  basin narrower than the spacing towards its neighbours (measured: IGG's basin under ``schedule=constant`` on
  ``tiny_small``, 0.3 wide in log(1 + w′), had the second-lowest FID of a sweep's basins and ranked fourth, past
  ``screen.regions``, by smoothed FID).
  The basins not worse than the best one beyond noise (the paired bootstrap interval of the FID difference at the
  last rung, the race's rule) are kept for the refinement, at most ``screen.regions``, best first.

Each (point, rung) is one job of the ``screen`` ledger study (:class:`tuners.studies.Ledger`): a killed sweep resumes
where it stopped, and the survivors of every rung are a function of the stored records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
import torch
from scipy.stats import norm, spearmanr

from pipeline.config.schema import ScreenConfig
from pipeline.core.guidance import KINDS
from tuners.jobs import Done, Job, Observer, Pool, TrialRecord
from tuners.proxy import gaps_of
from tuners.scoring import Difference, FeatureBank, FidScore, Scorer, direction, heads_first, scored_record
from tuners.space import Candidate, Interval, interval_code
from tuners.studies import Ledger, job_key
from tuners.surrogate import log_weights, posterior_mean

STAGE = "screen"


@dataclass(frozen=True)
class Curve:
    """A line through one kind's weights: a point is its total weight t (w, w′, or w + w′ for mixed)."""

    kind: str
    share: float | None = None  # mixed: w′ / (w + w′) along the ray
    window: int | None = None  # IGG kinds: the attention window (None: global)
    interval: Interval | None = None  # with search.intervals: the guided scales

    def at(self, total: float) -> Candidate:
        """The candidate of this curve at total weight `total` (w′ = share · total when the kind has both)."""
        weights = KINDS[self.kind].weights
        if len(weights) == 1:
            values = {weights[0]: total}
        else:
            assert self.share is not None
            values = {"w_cfg": (1 - self.share) * total, "w_igg": self.share * total}
        return Candidate(w_cfg=values.get("w_cfg"), w_igg=values.get("w_igg"),
                         window=self.window if KINDS[self.kind].windowed else None, interval=self.interval)

    def holds(self, candidate: Candidate) -> bool:
        """Whether `candidate` has this curve's kind, window and interval (its total weight may lie anywhere)."""
        return (candidate.kind == self.kind and candidate.interval == self.interval
                and (not KINDS[self.kind].windowed or candidate.window == self.window))

    def label(self) -> str:
        """E.g. ``cfg``, ``igg global``, ``mixed w'/(w+w')=0.5 global``."""
        parts = [self.kind if self.share is None else f"{self.kind} w'/(w+w')={self.share:g}"]
        if KINDS[self.kind].windowed:
            parts.append("global" if self.window is None else f"window {self.window}")
        if self.interval is not None:
            parts.append(f"scales {interval_code(self.interval)}")
        return " ".join(parts)


def curves_of(kinds: list[str], windows: list[int | None], shares: list[float],
              intervals: list[Interval] | None) -> list[Curve]:
    """Every curve of a sweep, in the order of `kinds`."""
    return [Curve(kind, share, window, interval) for kind in kinds for interval in intervals or [None]
            for window in (windows if KINDS[kind].windowed else [None])
            for share in (shares if len(KINDS[kind].weights) > 1 else [None])]


def total(candidate: Candidate) -> float:
    """The total weight of a candidate: w + w′ (a missing term counts 0)."""
    return sum(candidate.weights().values())


def spacing(points: int, floor: float, cap: float) -> float:
    """The distance in u = log(1 + t) between two neighbouring screen points."""
    return (math.log1p(cap) - math.log1p(floor)) / (points - 1)


def totals(points: int, floor: float, cap: float) -> list[float]:
    """`points` totals from `floor` to `cap`, evenly spaced in log(1 + t) (the ends exact)."""
    step = spacing(points, floor, cap)
    inner = [math.expm1(math.log1p(floor) + j * step) for j in range(1, points - 1)]
    return [floor, *inner, cap]


def smooth(totals_N: list[float], fid_N: list[float], se_N: list[float], lengthscale: float) -> list[float]:
    """The smoothed FID of one curve's points (:func:`tuners.surrogate.posterior_mean` along u = log(1 + t))."""
    fid = torch.tensor(fid_N, dtype=torch.float64)
    u_N1 = log_weights(torch.tensor(totals_N, dtype=torch.float64)[:, None])
    mean_N = posterior_mean(u_N1, torch.zeros(len(fid_N), dtype=torch.long), fid.log(),
                            (torch.tensor(se_N, dtype=torch.float64) / fid).square(), lengthscale=lengthscale,
                            kinship=1.0)
    return mean_N.exp().tolist()


def descend(values: list[float]) -> list[int]:
    """For each index of a curve's values (in order of weight), the index of the local minimum it descends to,
    moving to the lower neighbour while one is lower."""
    out = []
    for j in range(len(values)):
        k = j
        while (low := min((i for i in (k - 1, k + 1) if 0 <= i < len(values)), key=values.__getitem__,
                          default=k)) != k and values[low] < values[k]:
            k = low
        out.append(k)
    return out


@dataclass
class Rho:
    """Spearman's ρ between the proxy's gap and FID over the screen's points, with its interval at `level` (Fisher
    z, variance 1.06 / (n − 3), Fieller et al. 1957)."""

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, gaps: list[float], fids: list[float], level: float) -> Rho | None:
        """None with fewer than 4 points or a constant column."""
        if len(gaps) < 4 or len(set(gaps)) < 2 or len(set(fids)) < 2:
            return None
        rho = float(spearmanr(gaps, fids).statistic)
        z, half = math.atanh(max(-0.999999, min(0.999999, rho))), norm.ppf(0.5 + level / 2) * math.sqrt(
            1.06 / max(len(gaps) - 3, 1))
        return cls(rho, math.tanh(z - half), math.tanh(z + half), len(gaps))

    def verdict(self) -> str:
        """One line: did a lower gap go with a lower FID on this backbone?"""
        head = f"ρ(gap, FID) = {self.value:+.2f} [{self.low:+.2f}, {self.high:+.2f}] over {self.n} screened points"
        return head + {1: ": a lower gap went with a lower FID, the proxy pointed the right way on this backbone",
                       -1: ": a lower gap went with a higher FID, the proxy pointed the wrong way on this backbone",
                       0: ": no direction beyond noise, the proxy did not point either way on this backbone",
                       }[direction(self.low, self.high)]


@dataclass
class ScreenPoint:
    """One screened point: its curve and total weight, its FID at each rung it reached, and its smoothed FID."""

    curve: Curve
    total: float
    scores: dict[int, FidScore] = field(default_factory=dict)  # N -> its FID there
    smoothed: dict[int, float] = field(default_factory=dict)  # N -> smoothed FID over the curve's points at N
    basin: int = -1  # the point (index on its curve, by weight) whose local minimum it descends to at the first rung
    gap: float | None = None  # the proxy's gap, measured on the first batch of its first job
    record: TrialRecord | None = None  # the record of its last job

    @property
    def candidate(self) -> Candidate:
        return self.curve.at(self.total)

    @property
    def reached(self) -> int:
        return max(self.scores, default=0)


@dataclass
class Basin:
    """A local minimum of a curve's smoothed FID, represented by its point of lowest FID at the last rung (with its
    smoothed FID there); `worse` is its FID difference to the best basin at that N, None for the best itself."""

    point: ScreenPoint
    smoothed: float
    worse: Difference | None = None

    @property
    def kept(self) -> bool:
        """Not worse than the best basin beyond noise."""
        return self.worse is None or self.worse.low <= 0


@dataclass
class ScreenResult:
    """The screen's answer: every point, the basins with a point at the last rung (best first), the ones refined."""

    points: list[ScreenPoint]
    basins: list[Basin]
    refined: list[Basin]
    num_images: int  # the last rung
    spacing: float  # between neighbouring points in log(1 + t)
    rho: Rho | None  # the proxy's gap against FID over the points of the first rung

    def best_of(self, kind: str) -> ScreenPoint | None:
        """The kind's best point at the last rung (lowest FID), None when it has none."""
        mine = [b for b in self.basins if b.point.curve.kind == kind]
        return mine[0].point if mine else None


@dataclass
class ScreenStage:
    """The screen of one sweep. Call :meth:`run`; its result starts the refinement."""

    study: optuna.Study
    curves: list[Curve]
    totals: list[float]  # the evenly spaced totals of every curve
    extra: list[Candidate]  # points the proxy adds: each on every curve that holds it, at its total weight
    config: ScreenConfig
    lengthscale: float  # of the smoothing, in log(1 + t) (refine.lengthscale)
    gap: str  # the proxy's objective, measured on every first job (tuners.proxy.gap_name)
    observer: Observer
    bank: FeatureBank
    scorer: Scorer
    points: list[ScreenPoint] = field(init=False)

    def __post_init__(self) -> None:
        self.points = []
        for curve in self.curves:
            mine = [*self.totals, *(total(c) for c in self.extra if curve.holds(c))]
            self.points += [ScreenPoint(curve, t) for t in sorted({round(t, 6): t for t in mine}.values())]

    def _job(self, point: ScreenPoint, num_images: int) -> Job:
        c = point.candidate
        return Job(c, num_images, self.bank.seed_of(c), fid=True,
                   start=self.bank.start_for(c, num_images, self.scorer.layers))

    def _finish(self, job: Job, done: Done) -> TrialRecord:
        return scored_record(STAGE, job, done, self.bank, self.scorer)

    def run(self, pool: Pool) -> ScreenResult:
        """Every rung in turn (each resumed from the ledger), then the basins."""
        alive, rungs = list(self.points), self.config.rungs
        for r, n in enumerate(rungs):
            jobs = {job_key(j): (j, p) for p in alive for j in [self._job(p, n)]}
            ledger = Ledger(self.study, STAGE, {k: j for k, (j, _) in jobs.items()}, self._finish, self.observer)
            done = ledger.run(pool)
            for key, (job, point) in jobs.items():
                if key in done:
                    point.record = done[key]
                    point.scores[n] = FidScore.of(done[key].metrics)
                    if job.start == 0 and done[key].signals:
                        point.gap = gaps_of(done[key].signals)[self.gap]
            alive = [p for p in alive if n in p.scores]
            self._smooth(alive, n)
            if r == 0:
                for curve in self.curves:
                    mine = [p for p in alive if p.curve == curve]
                    for p, k in zip(mine, descend([p.smoothed[n] for p in mine]), strict=True):
                        p.basin = k
            if r < len(rungs) - 1:
                alive = self._survivors(alive, n)
        if not alive:
            raise RuntimeError("no screen point was scored; see the failed screen runs in MLflow, then rerun")
        return self._result(alive, rungs[-1])

    def _smooth(self, alive: list[ScreenPoint], n: int) -> None:
        for curve in self.curves:
            mine = [p for p in alive if p.curve == curve]
            if mine:
                values = smooth([p.total for p in mine], [p.scores[n].fid for p in mine],
                                [p.scores[n].fid_se for p in mine], self.lengthscale)
                for p, v in zip(mine, values, strict=True):
                    p.smoothed[n] = v

    def _survivors(self, alive: list[ScreenPoint], n: int) -> list[ScreenPoint]:
        """Per curve the best `keep` share of its points at N by smoothed FID, each basin's best first."""
        out = []
        for curve in self.curves:
            ranked = sorted((p for p in alive if p.curve == curve), key=lambda p: p.smoothed[n])
            out += heads_first(ranked, lambda p: p.basin)[: math.ceil(self.config.keep * len(ranked))]
        return out

    def _result(self, alive: list[ScreenPoint], n: int) -> ScreenResult:
        reps = {}
        for p in sorted(alive, key=lambda p: p.scores[n].fid):
            reps.setdefault((p.curve, p.basin), p)
        basins = [Basin(p, p.smoothed[n]) for p in reps.values()]
        best = basins[0]
        features = self.bank.get(best.point.candidate, n, self.scorer.layers)
        for basin in basins[1:]:
            basin.worse = self.scorer.difference(self.bank.get(basin.point.candidate, n, self.scorer.layers),
                                                 features)
        refined = [b for b in basins if b.kept][: self.config.regions]
        first = self.config.rungs[0]  # one N for every point: ρ(gap, FID) over them
        scored = [p for p in self.points if first in p.scores and p.gap is not None and math.isfinite(p.gap)]
        rho = Rho.of([p.gap for p in scored], [p.scores[first].fid for p in scored],  # type: ignore[misc]
                     self.scorer.level)
        return ScreenResult(self.points, basins, refined, n,
                            spacing(len(self.totals), self.totals[0], self.totals[-1]), rho)
