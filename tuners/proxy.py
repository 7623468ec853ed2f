"""Stage 1 (proxy search): minimise the evenness-divergence equilibrium gap over every kind and its weights.

One Optuna study asks the kind (categorical) and its weights inside the current ranges; each trial samples a small
batch and is told the gap |E − D| of the configured signal pair (pipeline.metrics.equilibrium_gap, natural units:
no calibration, so the pick does not move with the range). The design points of every kind are enqueued first.
When the budget is spent and a kind's lowest-gap candidate lies at the upper edge of its range, that range grows
(tuners.space.Ranges) and ``search.n_trials // 2`` more trials run, at most ``search.max_grows`` times. The ranges
and the budget are the stage's state, stored on the study (user attr ``state``), so a resumed sweep continues.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import optuna
import torch
from optuna.trial import TrialState

from pipeline.config import ProxyConfig, SearchConfig
from pipeline.metrics import equilibrium_gap
from tuners.driver import drive
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, Done, Job, Observer, Pool, TrialRecord
from tuners.samplers import derive_seed, make_sampler
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
class ProxyStage:
    """The proxy search of one sweep. Call :meth:`run`; then :meth:`best` per kind for the FID stage."""

    study: optuna.Study
    kinds: list[str]
    search: SearchConfig
    proxy: ProxyConfig
    seed: int
    observer: Observer

    def __post_init__(self) -> None:
        self.ranges = Ranges.start(self.kinds, self.search)
        self.objective = gap_name(self.proxy.evenness, self.proxy.reference)
        stored = self.study.user_attrs.get(STATE)
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

    def run(self, pool: Pool) -> None:
        """Run trials until the budget is told; grow the ranges of kinds whose best sits at an edge, and go on."""
        while True:
            self._run_budget(pool)
            if self.state.grows >= self.search.max_grows or self.search.n_trials == 0:
                return
            grown = [kind for kind in self.kinds if (best := self.best(kind, 1, 6)) and self.ranges.widen(best[0][0])]
            if not grown:
                return
            self.state.grows += 1
            self.state.budget += max(1, self.search.n_trials // 2)
            self._save()

    def _run_budget(self, pool: Pool) -> None:
        """Ask and tell until `state.budget` trials are told; reproducible for a seed and a number of workers W.

        Trial i (the i-th to use budget) is asked by a sampler seeded with (seed, i) when exactly trials 0..i-W are
        told and i-W+1..i-1 run (constant liar sees those); results are told in index order, so the search does not
        depend on which worker finishes first. Trials a dead driver left running are failed and asked again first.
        """
        for params in fail_stale(self.study):
            self.study.enqueue_trial(params)
        told = sum(counts_toward_budget(t) for t in self.study.get_trials(deepcopy=False))
        asked = told
        budget = self.state.budget
        lag = pool.idle() + pool.pending()
        running: dict[int, tuple[int, optuna.Trial, Job]] = {}
        arrived: dict[int, tuple[optuna.Trial, Job, Done]] = {}

        def flush(upto: int) -> None:
            nonlocal told
            while told < upto and told in arrived:
                self._tell(*arrived.pop(told))
                told += 1

        def next_job() -> tuple[int, Job] | None:
            nonlocal asked
            if asked >= budget:
                flush(budget)
                return None
            flush(asked - lag + 1)
            if told < asked - lag + 1:
                return None  # the result of trial asked-W is not in yet
            self.study.sampler = make_sampler(self.search.sampler, derive_seed(self.seed, asked),
                                              self.search.n_startup_trials)
            trial = self.study.ask()
            kind = trial.suggest_categorical("kind", list(self.kinds))
            box = {w: tuple(span) for w, span in self.ranges.spans[kind].items()}
            job = Job(suggest(trial, kind, box, self.search.windows, intervals=self.search.interval_choices()),
                      self.proxy.num_images, self.seed)
            running[trial.number] = (asked, trial, job)
            asked += 1
            self.observer.started("proxy", trial.number, job)
            return trial.number, job

        def on_done(done: Done) -> None:
            index, trial, job = running.pop(done.tag)
            arrived[index] = (trial, job, done)
            if asked >= budget:
                flush(budget)

        drive(pool, next_job, on_done, desc="proxy", total=max(budget - told, 0))
        flush(budget)

    def _tell(self, trial: optuna.Trial, job: Job, done: Done) -> None:
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
