"""Optuna studies of a sweep: open or resume, recover trials left RUNNING by a dead driver, job ledgers.

A sweep named N owns three studies in one storage: ``N/calibration`` and ``N/confirm`` are ledgers (one trial per
fixed job, identified by its user attr ``job``), ``N/proxy`` is the searched study. Only the driver process talks to
them. A driver that dies leaves RUNNING trials; the next driver with the same name marks them FAIL (user attr
``stale``) before it asks anything, and the proxy stage re-asks their parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuners.driver import drive
from tuners.jobs import Done, Evaluation, Job, Observer, Pool

STAGES = ("calibration", "proxy", "confirm")


def study_name(sweep: str, stage: str) -> str:
    return f"{sweep}/{stage}"


def open_study(storage: str, name: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (resume). Direction: minimise."""
    return optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True
    )


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


def record(trial: optuna.Trial, evaluation: Evaluation) -> None:
    """Store an evaluation's numbers on its trial (user attrs), so a resumed sweep can rebuild its results."""
    trial.set_user_attr("signals", evaluation.signals)
    trial.set_user_attr("fid_metrics", evaluation.fid_metrics)


def fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)


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
        value_of: the trial's objective value from its evaluation (for display in Optuna; results live in user
            attrs ``signals`` and ``fid_metrics``).
    """

    def completed() -> dict[str, FrozenTrial]:
        return {t.user_attrs["job"]: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}

    fail_stale(study)
    todo = [key for key in jobs if key not in completed()]
    running: dict[int, tuple[optuna.Trial, Job]] = {}

    def next_job() -> tuple[int, Job] | None:
        if not todo:
            return None
        key = todo.pop(0)
        trial = study.ask()
        trial.set_user_attr("job", key)
        job = jobs[key]
        trial.set_user_attr("candidate", job.candidate.as_dict())
        trial.set_user_attr("num_images", job.num_images)
        running[trial.number] = (trial, job)
        observer.started(stage, trial.number, job)
        return trial.number, job

    def on_done(done: Done) -> None:
        trial, job = running.pop(done.tag)
        trial.set_user_attr("retries", done.retries)
        reason = done.error or (done.evaluation.error if done.evaluation else "no evaluation")
        value = value_of(done.evaluation) if done.evaluation and not done.evaluation.error else float("nan")
        if reason is None and value != value:
            reason = "objective is not a finite number"
        if reason is not None:
            fail(study, trial, reason)
            observer.failed(stage, trial.number, job, reason, done.retries)
            return
        assert done.evaluation is not None
        record(trial, done.evaluation)
        study.tell(trial, value)
        observer.finished(stage, trial.number, job, done, {})

    drive(pool, next_job, on_done, desc=stage, total=len(todo))
    finished = completed()
    return {key: finished[key] for key in jobs if key in finished}
