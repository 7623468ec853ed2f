"""Stage 1 (proxy search): minimise the evenness-divergence equilibrium gap over every kind and its weights.

One Optuna study asks the kind (categorical) and its weights inside the current ranges; each trial samples a small
batch and is told the gap |E − D| of the configured signal pair (pipeline.core.metrics.equilibrium_gap, natural units:
no calibration, so the pick does not move with the range). The design points of every kind are enqueued first.
When the budget is spent and a kind's lowest-gap candidate lies at the upper edge of its range, that range grows
(tuners.space.Ranges) and ``search.n_trials // 2`` more trials run, at most ``search.max_grows`` times. The ranges
and the budget are the stage's state, stored on the study (user attr ``state``), so a resumed sweep continues.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import optuna
import torch
from optuna.trial import TrialState

from pipeline.config.schema import ProxyConfig, SearchConfig
from pipeline.core.metrics import equilibrium_gap
from pipeline.core.seeds import derive_seed
from tuners.driver import drive
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, Done, Job, Observer, Pool, TrialRecord
from tuners.samplers import make_sampler
from tuners.space import Candidate, Ranges, design_points, from_params, suggest, trial_params
from tuners.studies import counts_toward_budget, fail_stale, reason_of, record_of, tell

STATE = "state"  # proxy-study user attr: ProxyState


def gap_name(evenness: str, reference: str) -> str:
    """Metric name of the gap between an evenness kind (vocab|tokens) and a divergence reference (uncond|cond)."""
    return f"gap_{evenness}_{reference}"


def gaps_of(signals: dict[str, float]) -> dict[str, float]:
    """Equilibrium gap |E − D| of every (evenness, divergence reference) pair of a trial's signals."""
    return {gap_name(e, d): float(equilibrium_gap(torch.tensor(signals[e_name]), torch.tensor(signals[d_name])))
            for e, e_name in EVENNESS_SIGNAL.items() for d, d_name in DIVERGENCE_SIGNAL.items()}


@dataclass
class ProxyState:
    """What the stage has decided so far: the budget (trials to tell) and the ranges, kind -> weight -> [lo, hi]."""

    budget: int
    grows: int
    spans: dict[str, dict[str, list[float]]]


@dataclass
class ProxyResult:
    """What the proxy found: its lowest-gap candidate of each kind, and every trial (for the signal plots)."""

    picks: list[Candidate]
    records: list[tuple[Candidate, TrialRecord]]


@dataclass
class ProxyStage:
    """The proxy search of one sweep (none with ``search.n_trials=0``). Call :meth:`run`."""

    study: optuna.Study
    kinds: list[str]
    search: SearchConfig
    proxy: ProxyConfig
    seed: int
    observer: Observer

    decimals: int = 6  # candidates equal after rounding their weights are one (the picks are distinct)

    def __post_init__(self) -> None:
        self.ranges = Ranges.start(self.kinds, self.search)
        self.objective = gap_name(self.proxy.evenness, self.proxy.reference)
        stored = self.study.user_attrs.get(STATE)
        if self.search.n_trials == 0:
            return
        if stored is not None:
            self.state = ProxyState(**stored)
            self.ranges.spans = self.state.spans
        else:
            intervals = self.search.interval_choices()
            points = design_points(self.kinds, self.ranges, self.proxy.design, intervals[0] if intervals else None)
            for c in dict.fromkeys(points):
                self.study.enqueue_trial({"kind": c.kind, **trial_params(c)})
            self.state = ProxyState(len(dict.fromkeys(points)) + self.search.n_trials, 0, self.ranges.spans)
            self._save()

    def _save(self) -> None:
        self.study.set_user_attr(STATE, asdict(self.state))

    def records(self) -> list[tuple[Candidate, TrialRecord]]:
        """Every COMPLETE proxy trial: its candidate and record, in trial order."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [(from_params(t.params), record_of(t)) for t in sorted(trials, key=lambda t: t.number)]

    def best(self, kind: str, count: int, decimals: int) -> list[tuple[Candidate, float]]:
        """The `count` lowest-gap distinct candidates of `kind` (weights rounded to `decimals`)."""
        chosen: dict[tuple, tuple[Candidate, float]] = {}
        for c, rec in sorted(self.records(), key=lambda cr: cr[1].value if cr[1].value is not None else math.inf):
            if c.kind == kind and c.key(decimals) not in chosen and len(chosen) < count:
                chosen[c.key(decimals)] = (c, float(rec.value))  # type: ignore[arg-type]
        return list(chosen.values())

    def run(self, pool: Pool) -> ProxyResult:
        """Run trials until the budget is told; grow the ranges of kinds whose best sits at an edge, and go on."""
        while self.search.n_trials > 0:
            self._run_budget(pool)
            if self.state.grows >= self.search.max_grows:
                break
            grown = [kind for kind in self.kinds if (best := self.best(kind, 1, 6)) and self.ranges.widen(best[0][0])]
            if not grown:
                break
            self.state.grows += 1
            self.state.budget += max(1, self.search.n_trials // 2)
            self._save()
        return ProxyResult([c for k in self.kinds for c, _ in self.best(k, 1, self.decimals)], self.records())

    def _run_budget(self, pool: Pool) -> None:
        """Ask and tell until `state.budget` trials are told (:class:`Budget`). Trials a dead driver left running
        are failed and asked again first."""
        for params in fail_stale(self.study):
            self.study.enqueue_trial(params)
        told = sum(counts_toward_budget(t) for t in self.study.get_trials(deepcopy=False))
        steps = Budget(self, self.state.budget, pool.idle() + pool.pending(), told)
        drive(pool, steps, desc="proxy", total=max(steps.budget - told, 0))
        steps.flush(steps.budget)

    def finish(self, trial: optuna.Trial, job: Job, done: Done) -> None:
        """Tell one finished trial: its gap (or why it failed), to the observer first, then to Optuna."""
        reason = reason_of(done)
        signals = done.evaluation.signals if done.evaluation is not None else {}
        gaps = gaps_of(signals) if reason is None else {}
        if reason is None and not math.isfinite(gaps[self.objective]):
            reason = f"{self.objective} is not finite (signals {signals})"
        record = TrialRecord.of("proxy", job, done, value=gaps.get(self.objective), gaps=gaps, error=reason)
        if reason is not None:  # the observer hears first: a trial Optuna has finished is finished in MLflow
            self.observer.failed("proxy", trial.number, job, reason, done.retries)
        else:
            e_name = EVENNESS_SIGNAL[self.proxy.evenness]
            d_name = DIVERGENCE_SIGNAL[self.proxy.reference]
            selected = {"E": signals[e_name], "D": signals[d_name], "gap": gaps[self.objective]}
            self.observer.finished("proxy", trial.number, job, done, {**selected, **gaps})
        tell(self.study, trial, record)


@dataclass
class Budget:
    """One budget of proxy trials as driver steps, reproducible for a seed and a number of workers W (`lag`).

    Trial i (the i-th to use budget) is asked by a sampler seeded with (seed, i) when exactly trials 0..i-W are
    told and i-W+1..i-1 run (constant liar sees those); results are told in index order, so the search does not
    depend on which worker finishes first.
    """

    stage: ProxyStage
    budget: int  # trials told when it is spent
    lag: int  # W: the workers
    told: int  # trials told so far (this budget's and before)
    asked: int = field(init=False)
    running: dict[int, tuple[int, optuna.Trial, Job]] = field(default_factory=dict)  # tag -> (index, trial, job)
    arrived: dict[int, tuple[optuna.Trial, Job, Done]] = field(default_factory=dict)  # index -> finished, not told

    def __post_init__(self) -> None:
        self.asked = self.told

    def flush(self, upto: int) -> None:
        """Tell the arrived trials in index order, up to index `upto` (excluded)."""
        while self.told < upto and self.told in self.arrived:
            self.stage.finish(*self.arrived.pop(self.told))
            self.told += 1

    def next_job(self) -> tuple[int, Job] | None:
        if self.asked >= self.budget:
            self.flush(self.budget)
            return None
        self.flush(self.asked - self.lag + 1)
        if self.told < self.asked - self.lag + 1:
            return None  # the result of trial asked-W is not in yet
        st = self.stage
        st.study.sampler = make_sampler(st.search.sampler, derive_seed(st.seed, self.asked), st.search.n_startup_trials)
        trial = st.study.ask()
        kind = trial.suggest_categorical("kind", list(st.kinds))
        box = {w: tuple(span) for w, span in st.ranges.spans[kind].items()}
        job = Job(suggest(trial, kind, box, st.search.windows, intervals=st.search.interval_choices()),
                  st.proxy.num_images, st.seed)
        self.running[trial.number] = (self.asked, trial, job)
        self.asked += 1
        st.observer.started("proxy", trial.number, job)
        return trial.number, job

    def on_done(self, done: Done) -> None:
        index, trial, job = self.running.pop(done.tag)
        self.arrived[index] = (trial, job, done)
        if self.asked >= self.budget:
            self.flush(self.budget)
