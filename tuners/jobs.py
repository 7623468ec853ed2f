"""What the driver sends to a worker, what comes back, and the two interfaces the stages are written against.

A worker (a Ray actor in production, see pipeline/distributed.py) turns a `Job` into an `Evaluation`: numbers and PNG
bytes only. The stages in tuners/proxy.py and tuners/confirm.py talk to workers through a `Pool` and report every
trial to an `Observer` (MLflow in production); neither knows about Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tuners.space import Candidate

SIGNALS = ("token_evenness", "vocab_evenness", "div_uncond", "div_cond")
EVENNESS_SIGNAL = {"vocab": "vocab_evenness", "tokens": "token_evenness"}
DIVERGENCE_SIGNAL = {"uncond": "div_uncond", "cond": "div_cond"}


@dataclass(frozen=True)
class Job:
    """Sample `num_images` images (labels cycle over the classes) with one guidance setting and a fixed seed.

    With `fid` the worker also scores the images against the FID reference.
    """

    candidate: Candidate
    num_images: int
    seed: int
    fid: bool = False


@dataclass
class Evaluation:
    """A worker's answer to a `Job`.

    signals: trial-level value of each of `SIGNALS` (mean over images of the mean over scales 1..K-1); FID jobs
        measure them on their first batch only.
    per_scale: each of `SIGNALS` per scale index (mean over the same images), K values.
    fid_metrics: fid, isc, kid, precision, recall... (empty without `Job.fid`).
    images: artifact file name -> PNG bytes (sample grid, guidance heat map).
    error: why the evaluation is unusable (e.g. non-finite logits); the trial fails with this reason.
    node_id, hostname: the Ray node and the host of the worker that evaluated the job ("" outside Ray).
    """

    signals: dict[str, float] = field(default_factory=dict)
    per_scale: dict[str, list[float]] = field(default_factory=dict)
    fid_metrics: dict[str, float] = field(default_factory=dict)
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


class Observer(Protocol):
    """Hears about every trial of every stage (stage is ``calibration``, ``proxy`` or ``confirm``)."""

    def started(self, stage: str, number: int, job: Job) -> None: ...

    def finished(self, stage: str, number: int, job: Job, done: Done, metrics: dict[str, float]) -> None: ...

    def failed(self, stage: str, number: int, job: Job, reason: str, retries: int) -> None: ...
