"""Optuna studies of a sweep: open or resume, recover trials left RUNNING by a dead driver, job ledgers.

A sweep named N owns three studies in one storage: ``N/calibration`` and ``N/confirm`` are ledgers (one trial per
fixed job, identified by its user attr ``job``), ``N/proxy`` is the searched study. Only the driver process talks to
them. A driver that dies leaves RUNNING trials; the next driver with the same name marks them FAIL (user attr
``stale``) before it asks anything: a ledger redoes their jobs, the proxy stage re-asks their parameters.
Every stage reports a finished trial to its Observer (MLflow) before it tells Optuna, so a trial that Optuna holds as
finished is finished in MLflow too; a resumed sweep marks the MLflow runs of every other trial KILLED.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import store_lock
from tuners.driver import drive
from tuners.jobs import Done, Evaluation, Job, Observer, Pool


def study_name(sweep: str, stage: str) -> str:
    return f"{sweep}/{stage}"


def open_study(storage: str, name: str) -> optuna.Study:
    """Create the study, or load it when it exists (resume). Direction: minimise.

    A fresh SQLite storage is created under a cross-process lock (pipeline.config.store_lock).
    """
    with store_lock(storage):
        return optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)


def fail_stale(study: optuna.Study) -> list[FrozenTrial]:
    """Mark every RUNNING trial FAIL (user attr ``stale``); returns them as they were. Call before any ask."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "stale", True)
        study.tell(trial.number, state=TrialState.FAIL)
    return stale


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials use budget (COMPLETE, or FAIL for a reason of their own); stale FAILs are re-asked."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and not trial.user_attrs.get("stale", False)
    )


def record(trial: optuna.Trial, done: Done, **extra: object) -> None:
    """Store a finished job's numbers on its trial in one write (user attr ``result``: signals, fid_metrics,
    retries and `extra`), so a resumed sweep can rebuild its results without re-running anything."""
    assert done.evaluation is not None
    trial.set_user_attr(
        "result",
        {"signals": done.evaluation.signals, "fid_metrics": done.evaluation.fid_metrics, "retries": done.retries,
         **extra},
    )


def fail(study: optuna.Study, trial: optuna.Trial, reason: str, retries: int) -> None:
    """Finish a trial as FAIL with its reason (user attr ``failure``); it uses budget, it is not re-asked."""
    trial.set_user_attr("failure", {"reason": reason, "retries": retries})
    study.tell(trial, state=TrialState.FAIL)


def reason_of(done: Done) -> str | None:
    """Why a finished job is unusable (worker error or evaluation error), or None."""
    if done.error is not None:
        return done.error
    return "no evaluation" if done.evaluation is None else done.evaluation.error


def run_ledger(
    study: optuna.Study,
    pool: Pool,
    stage: str,
    jobs: dict[str, Job],
    value_of: Callable[[Evaluation], float],
    observer: Observer,
) -> dict[str, FrozenTrial]:
    """Evaluate the jobs not yet COMPLETE in the ledger study; return the COMPLETE trial of every job that has one.

    Args:
        jobs: ledger key -> job; a key identifies the job across runs.
        value_of: the trial's objective value from its evaluation (for display in Optuna; the numbers live in
            the user attr ``result``).
    """

    def completed() -> dict[str, FrozenTrial]:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {t.user_attrs["job"]["key"]: t for t in trials}

    fail_stale(study)
    todo = [key for key in jobs if key not in completed()]
    running: dict[int, tuple[optuna.Trial, Job]] = {}

    def next_job() -> tuple[int, Job] | None:
        if not todo:
            return None
        key = todo.pop(0)
        job = jobs[key]
        trial = study.ask()
        trial.set_user_attr(
            "job", {"key": key, "candidate": job.candidate.as_dict(), "num_images": job.num_images, "fid": job.fid}
        )
        running[trial.number] = (trial, job)
        observer.started(stage, trial.number, job)
        return trial.number, job

    def on_done(done: Done) -> None:
        trial, job = running.pop(done.tag)
        reason = reason_of(done)
        value = value_of(done.evaluation) if reason is None and done.evaluation is not None else math.nan
        if reason is None and not math.isfinite(value):
            reason = f"objective {value} is not a finite number"
        if reason is not None:  # the observer hears first: a trial Optuna has finished is finished in MLflow
            observer.failed(stage, trial.number, job, reason, done.retries)
            fail(study, trial, reason, done.retries)
            return
        observer.finished(stage, trial.number, job, done, {})
        record(trial, done)
        study.tell(trial, value)

    drive(pool, next_job, on_done, desc=stage, total=len(todo))
    finished = completed()
    return {key: finished[key] for key in jobs if key in finished}
