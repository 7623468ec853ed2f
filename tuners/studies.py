"""Optuna studies of a sweep: open or resume, recover trials left RUNNING by a dead driver, job ledgers.

A sweep named N owns its studies in one storage: ``N/proxy`` (the proxy search), ``N/screen`` (a ledger: one
trial per fixed job, identified by its user attr ``job``), ``N/refine/<kind>`` (the FID search of a guidance kind)
and ``N/confirm`` (a ledger). Only the driver process talks to them. Every finished trial holds a
:class:`tuners.jobs.TrialRecord` (user attr ``record``); a trial that is FAIL without one was interrupted: a driver
that dies leaves RUNNING trials, and the next driver with the same name fails them (public ``tell``) before it asks
anything. A ledger redoes their jobs, a search re-asks their parameters (``enqueue_trial``). Every stage reports a
finished trial to its Observer (MLflow) before it tells Optuna, so a trial that Optuna holds as finished is finished
in MLflow too; a resumed sweep marks the MLflow runs of every other trial KILLED.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.data.files import store_lock
from tuners.driver import drive
from tuners.jobs import Done, Job, Observer, Pool, TrialRecord

RECORD = "record"  # user attr of every finished trial: TrialRecord.as_dict()


def study_name(sweep: str, stage: str) -> str:
    """``<sweep>/<stage>``; stage is ``proxy``, ``refine/<kind>`` or ``confirm``."""
    return f"{sweep}/{stage}"


def open_study(storage: str, name: str) -> optuna.Study:
    """Create the study, or load it when it exists (resume). Direction: minimise.

    A fresh SQLite storage is created under a cross-process lock (pipeline.data.files.store_lock).
    """
    with store_lock(storage):
        return optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)


def fail_stale(study: optuna.Study) -> list[dict]:
    """Fail every RUNNING trial (a dead driver's); returns their params in ask order. Call before any ask.

    Trials left WAITING (enqueued, never asked) need nothing: the next ``ask`` takes them first.
    """
    stale = sorted(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), key=lambda t: t.number)
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    return [dict(t.params) for t in stale if t.params]


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials use budget (COMPLETE, or FAIL with a record of why); interrupted ones are re-asked."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and RECORD in trial.user_attrs)


def record_of(trial: FrozenTrial) -> TrialRecord:
    """The typed record of a finished trial."""
    return TrialRecord(**trial.user_attrs[RECORD])


def tell(study: optuna.Study, trial: optuna.Trial, record: TrialRecord) -> None:
    """Store the record on the trial, then tell Optuna: COMPLETE with its value, or FAIL when it has an error."""
    trial.set_user_attr(RECORD, record.as_dict())
    if record.error is None:
        study.tell(trial, record.value)
    else:
        study.tell(trial, state=TrialState.FAIL)


def reason_of(done: Done) -> str | None:
    """Why a finished job is unusable (worker error or evaluation error), or None."""
    if done.error is not None:
        return done.error
    return "no evaluation" if done.evaluation is None else done.evaluation.error


def job_key(job: Job) -> str:
    """Ledger identity of a job: its candidate, image range and seed."""
    return json.dumps([*job.candidate.identity(), job.start, job.num_images, job.seed, job.fid])


@dataclass
class Ledger:
    """A stage of fixed jobs, each one trial of a ledger study (user attr ``job``: :func:`job_key`).

    It is a stage of the driver loop (:func:`tuners.driver.drive`: ``next_job`` / ``on_done``), its counters are
    fields, and its state is the study: the jobs already COMPLETE are read back, not run again; trials a dead driver
    left RUNNING are failed and their jobs redone. The jobs left run longest first (a stable sort: ties keep their
    order), so the workers finish a batch together. ``finish`` turns a finished job into its record (value and
    metrics, or an error), in the driver.
    """

    study: optuna.Study
    stage: str
    jobs: dict[str, Job]
    finish: Callable[[Job, Done], TrialRecord]
    observer: Observer
    todo: list[str] = field(init=False)
    running: dict[int, tuple[optuna.Trial, Job]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        fail_stale(self.study)
        told = self.completed()
        self.todo = sorted((key for key in self.jobs if key not in told), key=lambda key: -self.jobs[key].sampled)

    def completed(self) -> dict[str, TrialRecord]:
        """Every COMPLETE job of the study: ledger key -> record."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {t.user_attrs["job"]: record_of(t) for t in trials}

    def next_job(self) -> tuple[int, Job] | None:
        if not self.todo:
            return None
        key = self.todo.pop(0)
        job = self.jobs[key]
        trial = self.study.ask()
        trial.set_user_attr("job", key)
        self.running[trial.number] = (trial, job)
        self.observer.started(self.stage, trial.number, job)
        return trial.number, job

    def on_done(self, done: Done) -> None:
        trial, job = self.running.pop(done.tag)
        reason = reason_of(done)
        record = self.finish(job, done) if reason is None else TrialRecord.of(self.stage, job, done, error=reason)
        if record.error is None and (record.value is None or not math.isfinite(record.value)):
            record.error = f"objective {record.value} is not a finite number"
        if record.error is not None:  # the observer hears first: a trial Optuna has finished is finished in MLflow
            self.observer.failed(self.stage, trial.number, job, record.error, done.retries)
        else:
            self.observer.finished(self.stage, trial.number, job, done, record.metrics)
        tell(self.study, trial, record)

    def run(self, pool: Pool) -> dict[str, TrialRecord]:
        """Evaluate the jobs not yet COMPLETE; return the record of every job that has one (key -> record)."""
        drive(pool, self, desc=self.stage, total=len(self.todo))
        finished = self.completed()
        return {key: finished[key] for key in self.jobs if key in finished}
