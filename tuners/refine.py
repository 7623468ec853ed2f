"""FID refinement: a seeded Optuna search on low-N FID inside a moving trust region around each basin the screen kept.

Each region has its own study (``<sweep>/refine/<kind>-<i>``) and :class:`tuners.space.Region`: a box around the
region's best so far, which moves with it, grows when the best lies on its edge (up to ``search.max_weight``) and
shrinks when a round finds nothing better. It starts at a basin of the screen (:mod:`tuners.screen`), its half-width
the screen's spacing, and the screen's points around the basin already scored at ``refine.num_images`` are told to
its study first (``add_trial``: their images are not drawn again). A round after a growth starts with a pattern step:
the best moved on in the direction it grew (half the radius before the growth), then the sampler's picks. The region
lives in u = log(1 + w) (:class:`tuners.space.Region`) and its weights are sampled uniformly in log w, never below
``refine.min_weight``. Every trial samples the same labels; its sampler seeds are the candidate's own
(:meth:`tuners.scoring.FeatureBank.seed_of`) unless ``refine.common_seeds``, and the race extends these images.

"Best" is by smoothed FID (:mod:`tuners.surrogate`: the posterior mean of log FID given all the region's trials and
their bootstrap noise), not by the lowest single FID, which at this N is mostly the luckiest draw. The region
follows the smoothed best; the finalists are every region's best, then the next lowest smoothed FIDs.

Trials run in rounds of ``launcher.workers`` trials per region (every worker busy, every region advancing); results
are told at the end of a round in ask order, so the search is the same for a seed and a number of workers whatever
the completion order, and a resumed sweep replays the regions from the told trials.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from pipeline.config.schema import RefineConfig, SearchConfig
from pipeline.core.guidance import KINDS
from pipeline.core.seeds import derive_seed
from tuners.driver import drive
from tuners.jobs import Done, Job, Observer, Pool, TrialRecord
from tuners.samplers import make_sampler
from tuners.scoring import FeatureBank, FidScore, Scorer, heads_first, scored_record
from tuners.space import WEIGHTS, Candidate, Region, from_params, interval_code, suggest, trial_params
from tuners.studies import RECORD, counts_toward_budget, fail_stale, reason_of, record_of, tell
from tuners.surrogate import log_weights, posterior_mean


@dataclass(frozen=True)
class Start:
    """Where a trust region starts: its kind, its centre, its half-width in log(1 + w), and the points around it
    already scored at ``refine.num_images`` (their records; told to the region's study before its first round)."""

    kind: str
    centre: Candidate
    radius: float
    seeds: tuple[TrialRecord, ...] = ()


@dataclass
class RegionSearch:
    """The refinement of one region: its study, its region, and the best candidate so far (by smoothed FID)."""

    name: str  # <kind>-<i>: the study refine/<name>
    start: Start
    stream: int  # the seed stream of its sampler
    study: optuna.Study
    initial: Region  # the region before any FID trial
    region: Region = field(init=False)
    best: tuple[Candidate, float] | None = None  # by smoothed FID
    pending: list[tuple[optuna.Trial, Job, Done]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.start.kind

    def counted(self) -> list[FrozenTrial]:
        """Trials that used budget, in ask order (the start's seeds first)."""
        return sorted((t for t in self.study.get_trials(deepcopy=False) if counts_toward_budget(t)),
                      key=lambda t: t.number)

    def asked(self) -> int:
        """Trials this region asked (its seeds are not asked)."""
        return len(self.counted()) - len(self.start.seeds)

    def seed(self, floor: float, cap: float, windows: list[int | None], intervals: list[str] | None) -> None:
        """Tell the start's seeds not yet in the study, as completed trials of the region's search space."""
        present = sum(RECORD in t.user_attrs and record_of(t).stage != "refine"
                      for t in self.study.get_trials(deepcopy=False))
        for record in self.start.seeds[present:]:
            c = Candidate(**record.candidate)
            distributions: dict[str, BaseDistribution] = {
                w: FloatDistribution(min(v, floor), cap, log=True) for w, v in c.weights().items()}
            if c.w_igg is not None:
                distributions["window"] = CategoricalDistribution(list(windows))
            if intervals is not None:
                distributions["interval"] = CategoricalDistribution(intervals)
            self.study.add_trial(create_trial(params=trial_params(c), distributions=distributions, value=record.value,
                                              user_attrs={RECORD: replace(record, images=0, worker_s=0.0).as_dict()}))


@dataclass
class RefineStage:
    """FID refinement of every region. Call :meth:`run`, then :meth:`finalists`."""

    studies: dict[str, optuna.Study]  # region name (<kind>-<i>) -> its study
    starts: dict[str, Start]  # region name -> where it starts
    refine: RefineConfig
    search: SearchConfig
    seed: int
    observer: Observer
    bank: FeatureBank
    scorer: Scorer

    def __post_init__(self) -> None:
        self.regions: dict[str, RegionSearch] = {}
        for i, (name, study) in enumerate(self.studies.items()):
            start = self.starts[name]
            weights = start.centre.weights()
            initial = Region(dict(weights), dict.fromkeys(weights, start.radius), self.search.max_weight,
                             self.refine.min_weight)
            self.regions[name] = RegionSearch(name, start, KINDS[start.kind].seed + 1000 * i, study, initial)

    def run(self, pool: Pool) -> RefineResult:
        """Rounds until every region has asked refine.n_trials trials (resumed trials included)."""
        self.per_round = per_round = pool.idle() + pool.pending()
        intervals = self.search.interval_choices()
        codes = None if intervals is None else [interval_code(i) for i in intervals]
        for search in self.regions.values():
            replay = fail_stale(search.study)
            if not search.study.get_trials(deepcopy=False) and not search.start.seeds:
                replay = [trial_params(search.start.centre)]  # nothing scored here yet: the centre goes first
            search.seed(self.refine.min_weight, self.search.max_weight, self.search.windows, codes)
            for params in replay:
                search.study.enqueue_trial(params)
            self._replay(search)
        while True:
            todo = [(s, i) for s in self.regions.values()
                    for i in range(s.asked(), min(self.refine.n_trials, s.asked() + per_round))]
            if not todo:
                return self.result()
            for search in self.regions.values():
                probe = search.region.probe()
                waiting = search.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if probe is not None and not waiting and search.asked() < self.refine.n_trials:
                    search.study.enqueue_trial(trial_params(probe))  # pattern step along the growth
            self._round(pool, todo)
            for search in self.regions.values():
                self._close_round(search)
                self._replay(search)

    def _replay(self, search: RegionSearch) -> None:
        """The region and its best as a function of its told trials: the seeds, then round by round (so a resumed
        sweep rebuilds them exactly)."""
        search.region = replace(search.initial, centre=dict(search.initial.centre),
                                radius=dict(search.initial.radius), history=[], direction={}, step={})
        search.best = None
        trials, size, seeded = search.counted(), self.per_round, len(search.start.seeds)
        if seeded:
            self._update(search, trials[:seeded])
        for end in range(seeded + size, len(trials) - (len(trials) - seeded) % size + 1, size):
            self._update(search, trials[:end])
        search.best = self._best(trials)

    def smoothed(self, trials: list[FrozenTrial]) -> list[tuple[FrozenTrial, float]]:
        """The completed `trials` of one kind with their smoothed FID (:mod:`tuners.surrogate`), in order."""
        done = [t for t in trials if t.state == TrialState.COMPLETE and math.isfinite(t.value)]
        if not done:
            return []
        weights_Nd = torch.tensor([[t.params[w] for w in WEIGHTS if w in t.params] for t in done])
        arms: dict[tuple, int] = {}  # (window, interval) -> a code: the kernel's categorical
        window_N = torch.tensor([arms.setdefault((t.params.get("window"), t.params.get("interval")), len(arms))
                                 for t in done])
        fid_N = torch.tensor([t.value for t in done], dtype=torch.float64)
        se_N = torch.tensor([FidScore.of(record_of(t).metrics).fid_se for t in done], dtype=torch.float64)
        mean_N = posterior_mean(log_weights(weights_Nd.double()), window_N, fid_N.log(), (se_N / fid_N).square(),
                                lengthscale=self.refine.lengthscale, kinship=self.refine.window_kinship)
        return list(zip(done, mean_N.exp().tolist(), strict=True))

    def _best(self, trials: list[FrozenTrial]) -> tuple[Candidate, float] | None:
        scored = self.smoothed(trials)
        if not scored:
            return None
        trial, value = min(scored, key=lambda ts: ts[1])
        return from_params(trial.params), value

    def _update(self, search: RegionSearch, trials: list[FrozenTrial]) -> None:
        """After a round: the best by smoothed FID over `trials` (all told so far); the region follows it."""
        before = search.best
        search.best = self._best(trials)
        if search.best is not None:
            improved = before is None or search.best[0] != before[0]
            search.region.update(search.best[0], improved, edge=self.refine.edge, grow=self.refine.grow,
                                 shrink=self.refine.shrink)

    def _round(self, pool: Pool, todo: list[tuple[RegionSearch, int]]) -> None:
        drive(pool, Round(self, list(enumerate(todo))), desc="refine", total=len(todo))

    def ask(self, search: RegionSearch, index: int) -> tuple[optuna.Trial, Job]:
        """Ask trial `index` of a region (its sampler seeded with the region's stream and `index`): its FID job."""
        search.study.sampler = make_sampler(self.refine.sampler, derive_seed(derive_seed(self.seed, search.stream),
                                                                             index), self.refine.n_startup_trials)
        trial = search.study.ask()
        with warnings.catch_warnings():  # an enqueued centre or pattern step may lie outside the box
            warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range", category=UserWarning)
            candidate = suggest(trial, search.kind, search.region.box(), self.search.windows, log=True,
                                intervals=self.search.interval_choices())
        job = Job(candidate, self.refine.num_images, self.bank.seed_of(candidate), fid=True)
        self.observer.started(f"refine/{search.name}", trial.number, job)
        return trial, job

    def _close_round(self, search: RegionSearch) -> None:
        """Tell the round's results of one kind in ask order."""
        for trial, job, done in sorted(search.pending, key=lambda p: p[0].number):
            self._tell(search, trial, job, done)
        search.pending = []

    def _tell(self, search: RegionSearch, trial: optuna.Trial, job: Job, done: Done) -> None:
        stage = f"refine/{search.name}"
        reason = reason_of(done)
        record = (scored_record("refine", job, done, self.bank, self.scorer) if reason is None
                  else TrialRecord.of("refine", job, done, error=reason))
        if record.error is None and not math.isfinite(record.value):
            record.error = f"FID {record.value} is not finite"
        if record.error is not None:
            self.observer.failed(stage, trial.number, job, record.error, done.retries)
        else:
            self.observer.finished(stage, trial.number, job, done, record.metrics)
        tell(search.study, trial, record)

    def history(self) -> dict[str, list[str]]:
        """Per region, what each round did to it (grew, kept, shrank)."""
        return {k: list(s.region.history) for k, s in self.regions.items()}

    def result(self) -> RefineResult:
        """Every told trial of every region with its smoothed FID, lowest first."""
        scored = sorted((Refined(from_params(t.params), record_of(t), value, s.name) for s in self.regions.values()
                         for t, value in self.smoothed(s.counted())), key=lambda r: r.smoothed)
        return RefineResult(scored, self.history())


@dataclass
class Round:
    """One round of the refinement as driver steps: the (region, index) trials to ask, in order; each finished job
    waits in its region until the round is told (in ask order)."""

    stage: RefineStage
    queue: list[tuple[int, tuple[RegionSearch, int]]]  # (tag, (region, trial index)) still to ask
    running: dict[int, tuple[RegionSearch, optuna.Trial, Job]] = field(default_factory=dict)

    def next_job(self) -> tuple[int, Job] | None:
        if not self.queue:
            return None
        tag, (search, index) = self.queue.pop(0)
        trial, job = self.stage.ask(search, index)
        self.running[tag] = (search, trial, job)
        return tag, job

    def on_done(self, done: Done) -> None:
        search, trial, job = self.running.pop(done.tag)
        search.pending.append((trial, job, done))


@dataclass(frozen=True)
class Refined:
    """A told refinement trial: its candidate and record, its smoothed FID, and the region (<kind>-<i>) it is in."""

    candidate: Candidate
    record: TrialRecord
    smoothed: float
    region: str


@dataclass
class RefineResult:
    """The refinement's trials, each with its smoothed FID (lowest first), and what the regions did."""

    scored: list[Refined]
    history: dict[str, list[str]]

    def finalists(self, count: int, decimals: int, separation: float) -> list[Refined]:
        """Up to `count` distinct candidates by smoothed FID: each kind's best (best kind first), then each other
        region's best, then the next lowest over all regions, skipping any within `separation` (Euclidean, in
        log(1 + w)) of a chosen one of the same kind and window: the smoothed FID of such a neighbour is nearly the
        chosen one's, so racing it would spend a finalist on one point twice. Every refined basin gets a finalist
        before any gets a second: the race, not the refinement's few low-N trials, decides between basins."""
        ranked = heads_first(heads_first(self.scored, lambda r: r.region), lambda r: r.candidate.kind)

        def near(a: Candidate, b: Candidate) -> bool:
            if a.kind != b.kind or a.window != b.window or a.interval != b.interval:
                return False
            return math.dist(*(log_weights(torch.tensor(list(c.weights().values()))).tolist() for c in (a, b))
                             ) < separation

        chosen: list[Refined] = []
        for r in ranked:
            if len(chosen) < count and not any(r.candidate.key(decimals) == c.candidate.key(decimals)
                                               or near(r.candidate, c.candidate) for c in chosen):
                chosen.append(r)
        return chosen

