"""What the driver sends to a worker, what comes back, and the two interfaces the stages are written against.

A worker (a Ray actor in production, see pipeline/runtime/distributed.py) turns a `Job` into an `Evaluation`: numbers
and PNG bytes only. Every `Stage` (proxy, screen, refine, race) talks to workers through a `Pool`, runs its jobs as
`Steps` of the driver loop and reports every trial to an `Observer` (MLflow in production); none knows about Ray or
MLflow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from tuners.space import Candidate

SIGNALS = ("token_evenness", "vocab_evenness", "div_uncond", "div_cond")
CLIP_LAYER = "clip_score"  # the per-image CLIP score among an FID job's features (text-to-image, confirm.clip_weights)
EVENNESS_SIGNAL = {"vocab": "vocab_evenness", "tokens": "token_evenness"}
DIVERGENCE_SIGNAL = {"uncond": "div_uncond", "cond": "div_cond"}
R_co = TypeVar("R_co", covariant=True)


@dataclass(frozen=True)
class Job:
    """Sample images `start`..`num_images`-1 (labels cycle over the classes) with one guidance setting and a seed.

    Image i depends only on the candidate, the seed, i and the batch size, so the images of a job that starts at N
    extend those of the same candidate up to N (a race rung adds images, it does not redraw them). With `fid` the
    worker returns the images' FID features instead of measuring the proxy signals on all of them.
    """

    candidate: Candidate
    num_images: int
    seed: int
    fid: bool = False
    start: int = 0

    @property
    def sampled(self) -> int:
        """Images this job samples."""
        return self.num_images - self.start


@dataclass
class Evaluation:
    """A worker's answer to a `Job`.

    signals: trial-level value of each of `SIGNALS` (mean over images of the mean over scales 1..K-1); FID jobs
        measure them on their first batch only.
    per_scale: each of `SIGNALS` per scale index (mean over the same images), K values.
    features: FID jobs: feature layer -> (sampled, F) float32 features of the job's images, in image order; with a
        CLIP scorer also ``clip_score`` -> (sampled, 1), each image's CLIP score against its prompt.
    images: artifact file name -> PNG bytes (sample grid, guidance heat map).
    error: why the evaluation is unusable (e.g. non-finite logits); the trial fails with this reason.
    node_id, hostname: the Ray node and the host of the worker that evaluated the job ("" outside Ray).
    """

    signals: dict[str, float] = field(default_factory=dict)
    per_scale: dict[str, list[float]] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    num_images: int = 0
    wall_s: float = 0.0
    images: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    node_id: str = ""
    hostname: str = ""

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Done:
    """A finished job: its tag, the evaluation or the error, and how many times it was re-run on a fresh worker."""

    tag: int
    evaluation: Evaluation | None
    error: str | None
    retries: int


class Pool(Protocol):
    """Workers that evaluate jobs; `submit` while `idle() > 0`, then `wait` for any job to finish."""

    def idle(self) -> int: ...

    def pending(self) -> int: ...

    def submit(self, tag: int, job: Job) -> None: ...

    def wait(self) -> Done: ...


class Steps(Protocol):
    """The jobs of a stage as the driver loop (:func:`tuners.driver.drive`) runs them: its counters are the
    object's fields, never closures."""

    def next_job(self) -> tuple[int, Job] | None:
        """The next (tag, job) to submit, or None when there is nothing to submit now."""
        ...

    def on_done(self, done: Done) -> None:
        """Take one finished job (in completion order)."""
        ...


class Stage(Protocol[R_co]):
    """One stage of a sweep (proxy, screen, refine, race): built from the previous stage's result, its state in the
    Optuna storage (a resumed sweep rebuilds it), and its own typed result, the next stage's input."""

    def run(self, pool: Pool) -> R_co:
        ...


class Observer(Protocol):
    """Hears about every trial of every stage (stage is ``calibration``, ``proxy`` or ``confirm``)."""

    def started(self, stage: str, number: int, job: Job) -> None: ...

    def finished(self, stage: str, number: int, job: Job, done: Done, metrics: dict[str, float]) -> None: ...

    def failed(self, stage: str, number: int, job: Job, reason: str, retries: int) -> None: ...


@dataclass
class TrialRecord:
    """What one finished trial of any stage holds (the Optuna user attr ``record``): enough to rebuild its result
    on resume without running anything again.

    stage: proxy | refine | confirm. value: what Optuna was told (gap or FID). signals and gaps: the proxy's numbers
    (signals are also measured on the first batch of FID jobs). metrics: FID-side numbers (fid, fid_low, fid_high,
    isc, ...). images: images sampled; worker_s: worker seconds. features: the file of the FID features (in the
    sweep's output folder), for FID jobs. error: why the trial failed (then it is FAIL, not COMPLETE).
    """

    stage: str
    kind: str
    candidate: dict[str, Any]
    num_images: int
    start: int
    seed: int
    value: float | None = None
    signals: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    images: int = 0
    worker_s: float = 0.0
    retries: int = 0
    features: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, stage: str, job: Job, done: Done | None = None, **fields: Any) -> TrialRecord:
        evaluation = done.evaluation if done is not None else None
        return cls(stage=stage, kind=job.candidate.kind, candidate=job.candidate.as_dict(), num_images=job.num_images,
                   start=job.start, seed=job.seed,
                   signals=dict(evaluation.signals) if evaluation is not None else {},
                   images=job.sampled if evaluation is not None else 0,
                   worker_s=evaluation.wall_s if evaluation is not None else 0.0,
                   retries=done.retries if done is not None else 0, **fields)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
