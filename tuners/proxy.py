"""Stage 0 (calibration) and stage 1 (proxy search): minimise the evenness-divergence equilibrium gap.

Calibration evaluates fixed design points (the diagonal of the search space plus the baselines) and keeps, for each
signal, its (min, max) over them: the min-max ranges of the equilibrium gap (pipeline.metrics.equilibrium_gap). The
ranges are stored in the proxy study's user attr ``ranges``; a resumed sweep reuses them. The proxy stage then asks
Optuna for candidates, one per idle worker, and tells each trial the gap of the configured signal pair. Every trial
also records the gap of every other pair (user attr ``gaps``), so the pairs can be compared afterwards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import GuidanceConfig, ProxyConfig, SearchConfig
from pipeline.metrics import equilibrium_gap
from tuners.driver import drive
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, SIGNALS, Done, Job, Observer, Pool
from tuners.samplers import derive_seed, make_sampler
from tuners.space import Candidate, suggest
from tuners.studies import counts_toward_budget, fail, reason_of, record, run_ledger


def gap_name(evenness: str, reference: str) -> str:
    """Metric name of the gap between an evenness kind (vocab|tokens) and a divergence reference (uncond|cond)."""
    return f"gap_{evenness}_{reference}"


@dataclass
class Calibration:
    """(min, max) of each signal over the calibration design points, and each point's signals."""

    ranges: dict[str, tuple[float, float]]
    points: dict[str, dict[str, float]]  # ledger key -> signals

    def gaps(self, signals: dict[str, float]) -> dict[str, float]:
        """Equilibrium gap of every (evenness, reference) pair; NaN where a calibration range is degenerate."""
        out = {}
        for evenness, e_name in EVENNESS_SIGNAL.items():
            for reference, d_name in DIVERGENCE_SIGNAL.items():
                e_range, d_range = self.ranges[e_name], self.ranges[d_name]
                if e_range[1] > e_range[0] and d_range[1] > d_range[0]:
                    gap = equilibrium_gap(
                        torch.tensor(signals[e_name]), torch.tensor(signals[d_name]), e_range, d_range
                    )
                    out[gap_name(evenness, reference)] = float(gap)
                else:
                    out[gap_name(evenness, reference)] = math.nan
        return out


def job_key(job: Job) -> str:
    """Ledger identity of a job: its candidate, image count and seed."""
    c = job.candidate
    return json.dumps([c.w_cfg, c.w_igg, c.window, job.num_images, job.seed, job.fid])


def calibrate(
    study: optuna.Study,
    proxy_study: optuna.Study,
    pool: Pool,
    points: list[Candidate],
    proxy: ProxyConfig,
    seed: int,
    observer: Observer,
) -> Calibration:
    """Evaluate the design points not yet in the calibration ledger; store the signal ranges on the proxy study.

    Raises:
        RuntimeError: a design point failed, or the configured evenness/divergence did not vary over the points.
    """
    jobs = {job_key(job): job for job in (Job(c, proxy.num_images, seed) for c in points)}
    d_name = DIVERGENCE_SIGNAL[proxy.reference]
    finished = run_ledger(study, pool, "calibration", jobs, lambda ev: ev.signals[d_name], observer)
    missing = [jobs[k].candidate.label() for k in jobs if k not in finished]
    if missing:
        raise RuntimeError(f"calibration failed at {', '.join(missing)}; see the failed runs in MLflow, then rerun")
    points_signals = {key: trial.user_attrs["result"]["signals"] for key, trial in finished.items()}
    ranges = {
        name: (min(s[name] for s in points_signals.values()), max(s[name] for s in points_signals.values()))
        for name in SIGNALS
    }
    for name in (EVENNESS_SIGNAL[proxy.evenness], d_name):
        low, high = ranges[name]
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise RuntimeError(
                f"{name} did not vary over the calibration points ({low}..{high}); "
                "widen the search ranges or proxy.calibration"
            )
    proxy_study.set_user_attr("ranges", {name: list(r) for name, r in ranges.items()})
    return Calibration(ranges=ranges, points=points_signals)


def _recover(study: optuna.Study) -> list[dict]:
    """Fail the trials a dead driver left RUNNING or WAITING (user attr ``stale``); their params, in ask order.

    Trials are asked in number order, so sorting by number gives the order in which they must be re-asked.
    """
    leftovers = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    replay = []
    for trial in sorted(leftovers, key=lambda t: t.number):
        params = trial.params if trial.state == TrialState.RUNNING else trial.system_attrs.get("fixed_params", {})
        # Optuna's public tell() refuses WAITING trials; the storage call is the same state change for both.
        study._storage.set_trial_user_attr(trial._trial_id, "stale", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if params:
            replay.append(dict(params))
    return replay


def run_proxy(
    study: optuna.Study,
    pool: Pool,
    guidance: GuidanceConfig,
    search: SearchConfig,
    proxy: ProxyConfig,
    calibration: Calibration,
    seed: int,
    observer: Observer,
) -> list[FrozenTrial]:
    """Run proxy trials until `search.n_trials` have finished (resumed trials included); return the COMPLETE ones.

    Reproducible for a given seed and number of workers W, whatever order the workers finish in and however often
    the driver is killed and rerun: trial i (the i-th to use budget) is asked by a sampler seeded with (seed, i)
    when exactly trials 0..i-W are told and i-W+1..i-1 run (constant liar sees those), and results are told in
    index order. A worker waits only when results arrive out of order. Trials a dead driver left unfinished are
    failed and their parameters re-asked first.
    """
    objective = gap_name(proxy.evenness, proxy.reference)
    e_name, d_name = EVENNESS_SIGNAL[proxy.evenness], DIVERGENCE_SIGNAL[proxy.reference]
    replay = _recover(study)
    told = sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))
    asked = told
    lag = pool.idle() + pool.pending()  # W: trials that may be asked ahead of the told prefix
    running: dict[int, tuple[int, optuna.Trial, Job]] = {}  # tag (trial number) -> (index, trial, job)
    arrived: dict[int, tuple[optuna.Trial, Job, Done]] = {}  # index -> finished, waiting for its turn to be told

    def tell(trial: optuna.Trial, job: Job, done: Done) -> None:
        reason = reason_of(done)
        signals = done.evaluation.signals if done.evaluation is not None else {}
        gaps = calibration.gaps(signals) if reason is None else {}
        if reason is None and not math.isfinite(gaps[objective]):
            reason = f"{objective} is not finite (signals {signals})"
        if reason is not None:  # the observer hears first: a trial Optuna has finished is finished in MLflow
            observer.failed("proxy", trial.number, job, reason, done.retries)
            fail(study, trial, reason, done.retries)
            return
        selected = {"E": signals[e_name], "D": signals[d_name], "gap": gaps[objective]}
        observer.finished("proxy", trial.number, job, done, {**selected, **gaps})
        record(trial, done, gaps=gaps)
        study.tell(trial, gaps[objective])

    def flush(upto: int) -> None:
        """Tell the arrived results with index < upto, in index order, up to the first one still running."""
        nonlocal told
        while told < upto and told in arrived:
            tell(*arrived.pop(told))
            told += 1

    def next_job() -> tuple[int, Job] | None:
        nonlocal asked
        if asked >= search.n_trials:
            flush(search.n_trials)
            return None
        flush(asked - lag + 1)
        if told < asked - lag + 1:
            return None  # the result of trial asked-W is not in yet
        if replay:
            study.enqueue_trial(replay.pop(0))
        else:
            study.sampler = make_sampler(search.sampler, derive_seed(seed, asked), search.n_startup_trials)
        trial = study.ask()
        job = Job(suggest(trial, guidance, search), proxy.num_images, seed)
        running[trial.number] = (asked, trial, job)
        asked += 1
        observer.started("proxy", trial.number, job)
        return trial.number, job

    def on_done(done: Done) -> None:
        index, trial, job = running.pop(done.tag)
        arrived[index] = (trial, job, done)
        if asked >= search.n_trials:
            flush(search.n_trials)

    drive(pool, next_job, on_done, desc="proxy", total=max(search.n_trials - told, 0))
    flush(search.n_trials)
    return study.get_trials(states=(TrialState.COMPLETE,))
