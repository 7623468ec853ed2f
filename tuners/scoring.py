"""FID in the driver: the features of FID jobs kept on disk by block, FID with its interval, paired differences.

Workers return the FID features of the images they sampled; the driver keeps them in ``<output_dir>/features`` (one
``.npy`` file per job, written atomically before the trial is told) so a race rung adds images to a candidate
instead of redrawing them, and a resumed sweep re-reads them. Blocks follow fixed boundaries
``[0, refine.num_images, *confirm.rungs]``: the features of a candidate at N are the concatenation of its blocks
below N. Every candidate is sampled with the same labels; its sampler seeds derive from its own seed
(:meth:`FeatureBank.seed_of`), so the FID noise of two candidates is independent and a smoothing surrogate can
average it out. Near-identical candidates on common random numbers would share one draw's luck, and at distinct
weights common seeds do not shrink the noise of a difference on the embedded backbone (docs/BENCHMARKS.md, Reference
grid); ``refine.common_seeds=true`` brings them back. The bootstrap of a difference resamples the same image
indices of both candidates: the paired bootstrap on common seeds, a valid one on independent images.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from pipeline.core.metrics import bootstrap_fid, normal_interval, resample_counts
from pipeline.core.sampling import spread_labels
from pipeline.core.seeds import derive_seed
from pipeline.data.files import atomic_write
from pipeline.fid.fidelity import FidEvaluator, Reference
from tuners.jobs import CLIP_LAYER, Done, Job, TrialRecord
from tuners.space import Candidate

T = TypeVar("T")


@dataclass
class Interval:
    """A value with its interval at the sweep's level."""

    value: float
    low: float
    high: float


@dataclass
class Difference:
    """FID(a) − FID(b) on the same images, with its paired bootstrap interval."""

    diff: float
    low: float
    high: float


def heads_first(ranked: list[T], group: Callable[[T], Hashable]) -> list[T]:
    """`ranked` (best first) with each group's best before any group's second: a cut of the result keeps one of
    every group before two of any (a basin's or a region's points are nearly one point)."""
    seen: set[Hashable] = set()
    heads: list[T] = []
    rest: list[T] = []
    for x in ranked:
        (rest if group(x) in seen else heads).append(x)
        seen.add(group(x))
    return heads + rest


def direction(low: float, high: float) -> int:
    """+1 when an interval lies above 0, -1 when below, 0 when it holds 0 (no direction beyond noise)."""
    return 1 if low > 0 else -1 if high < 0 else 0


@dataclass(frozen=True)
class FidScore:
    """The FID of a candidate's first N images with its interval at the scorer's level and its bootstrap standard
    error; the mean CLIP score with its interval when scored; every other evaluator metric (IS, KID,
    precision/recall) by its torch-fidelity name. `metrics()` is the flat form a trial logs and stores."""

    fid: float
    fid_low: float
    fid_high: float
    fid_se: float
    clip_score: Interval | None = None
    extra: Mapping[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {"fid": self.fid, "fid_low": self.fid_low, "fid_high": self.fid_high, "fid_se": self.fid_se,
               **self.extra}
        if self.clip_score is not None:
            c = self.clip_score
            out |= {"clip_score": c.value, "clip_score_low": c.low, "clip_score_high": c.high}
        return out

    @classmethod
    def of(cls, metrics: Mapping[str, float]) -> FidScore:
        """The score a trial logged (`metrics()`, read back from its record)."""
        own = {"fid", "fid_low", "fid_high", "fid_se", "clip_score", "clip_score_low", "clip_score_high"}
        clip = (Interval(metrics["clip_score"], metrics["clip_score_low"], metrics["clip_score_high"])
                if "clip_score" in metrics else None)
        return cls(metrics["fid"], metrics["fid_low"], metrics["fid_high"], metrics["fid_se"], clip,
                   {k: v for k, v in metrics.items() if k not in own})


def block_key(job: Job) -> str:
    """File stem of a job's features: a hash of its candidate, seed and image range."""
    c = job.candidate
    text = json.dumps([*c.identity(), job.seed, job.start, job.num_images])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def candidate_seed(seed: int, candidate: Candidate, *, common: bool) -> int:
    """The sampler seed of `candidate`'s images in a sweep seeded `seed`: `seed` itself with `common` (common random
    numbers), else one derived from `seed` and the candidate's weights and window, so the same candidate always
    draws the same images and two candidates draw independent ones."""
    if common:
        return seed
    text = json.dumps(candidate.identity())
    return derive_seed(seed, int(hashlib.sha256(text.encode()).hexdigest()[:15], 16))


@dataclass
class FeatureBank:
    """FID features of every FID job in `folder` (one .npy per job and layer); a job covers images start..N-1
    between two boundaries, and the features of a candidate at N chain such jobs from 0."""

    folder: Path
    boundaries: list[int]  # [0, refine.num_images, *confirm.rungs]
    seed: int  # the sweep seed
    common: bool = False  # every candidate on the sweep seed (common random numbers)

    def seed_of(self, candidate: Candidate) -> int:
        """The seed of `candidate`'s images (:func:`candidate_seed`)."""
        return candidate_seed(self.seed, candidate, common=self.common)

    def path(self, job: Job, layer: str) -> Path:
        return self.folder / f"{block_key(job)}.{layer}.npy"

    def has(self, job: Job, layers: list[str]) -> bool:
        return all(self.path(job, layer).is_file() for layer in layers)

    def put(self, job: Job, features: dict[str, np.ndarray]) -> str:
        """Write a job's features (layer -> (sampled, F) float32) atomically; returns the file stem."""
        for layer, array in features.items():
            if array.shape[0] != job.sampled:
                raise ValueError(f"{len(array)} feature rows for a job of {job.sampled} images")
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
            atomic_write(self.path(job, layer), buffer.getvalue())
        return block_key(job)

    def chain(self, candidate: Candidate, num_images: int, layers: list[str]) -> list[Job] | None:
        """Stored jobs that cover images 0..num_images-1 of `candidate` (the longest block first), or None."""
        stops = [b for b in self.boundaries if b <= num_images]
        if num_images not in stops:
            raise ValueError(f"{num_images} images is not a block boundary {self.boundaries[1:]}")
        pos, jobs = 0, []
        while pos < num_images:
            seed = self.seed_of(candidate)
            found = next((Job(candidate, end, seed, fid=True, start=pos) for end in reversed(stops)
                          if end > pos and self.has(Job(candidate, end, seed, fid=True, start=pos), layers)), None)
            if found is None:
                return None
            jobs.append(found)
            pos = found.num_images
        return jobs

    def start_for(self, candidate: Candidate, num_images: int, layers: list[str]) -> int:
        """Where a job extending `candidate` to `num_images` must start: the furthest stored boundary below it."""
        for stop in sorted((b for b in self.boundaries if b < num_images), reverse=True):
            if stop == 0 or self.chain(candidate, stop, layers) is not None:
                return stop
        return 0

    def get(self, candidate: Candidate, num_images: int, layers: list[str], start: int = 0) -> dict[str, Tensor]:
        """Features of images start..num_images-1 of `candidate`: layer -> (num_images - start, F) float32 (the
        blocks that end at or before `start` are not read)."""
        jobs = self.chain(candidate, num_images, layers)
        if jobs is None:
            raise ValueError(f"no stored features cover {num_images} images of {candidate.label()}")
        jobs = [j for j in jobs if j.num_images > start]
        return {layer: torch.from_numpy(np.concatenate([np.load(self.path(j, layer)) for j in jobs])[
            start - jobs[0].start:]) for layer in layers}


@dataclass
class Scorer:
    """FID (torch-fidelity) with a bootstrap interval, and paired bootstrap differences, from features.

    Args:
        evaluator: the driver's FidEvaluator (its metric options and feature layers; no images pass through it).
        reference: FID reference statistics.
        replicates: bootstrap resamples per estimate.
        level: confidence of the intervals (e.g. 0.95).
        seed: the sweep seed; resamples of images start..N-1 are the same for every candidate (pairing).
        conditions: the number of conditions the images cycle through (image i has condition
            ``spread_labels(i)``, :func:`pipeline.core.sampling.sweep_conditions`): the bootstrap resamples inside each
            condition (stratified, :func:`pipeline.core.metrics.resample_counts`) once every condition has at least two
            images, with the small-stratum correction below; None: a plain bootstrap over all images.
        clip: the features hold each image's CLIP score (:data:`tuners.jobs.CLIP_LAYER`): every scoring reports
            their mean, ``clip_score``, with its interval at `level` (normal, from the spread over images).
    """

    evaluator: FidEvaluator
    reference: Reference
    replicates: int
    level: float
    seed: int
    conditions: int | None = None
    clip: bool = False
    _cache: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)  # start:digest -> replicates

    @property
    def layers(self) -> list[str]:
        isc = [self.evaluator.isc_layer] if "isc" in self.evaluator.metrics else []
        return list(dict.fromkeys([self.evaluator.feature_layer, *isc, *([CLIP_LAYER] if self.clip else [])]))

    def _strata(self, num_images: int, start: int) -> Tensor | None:
        if self.conditions is None or num_images < 2 * self.conditions:
            return None
        return spread_labels(start + num_images, self.conditions)[start:]

    def _replicates(self, features_NF: Tensor, start: int) -> Tensor:
        """The bootstrap FIDs of these features, images start..start+N-1 of their candidates (computed once per
        distinct features: a race compares its current best with every other finalist, and scores each finalist
        before that)."""
        key = f"{start}:{hashlib.sha256(features_NF.contiguous().numpy().tobytes()).hexdigest()}"
        if key not in self._cache:
            mu, sigma = torch.from_numpy(self.reference.mu), torch.from_numpy(self.reference.sigma)
            strata_N = self._strata(len(features_NF), start)
            counts_RN = resample_counts(len(features_NF), self.replicates,  # the same for every candidate: paired
                                        derive_seed(self.seed, start + len(features_NF)), strata_N)
            replicates_R = bootstrap_fid(features_NF, mu, sigma, counts_RN)
            if strata_N is not None:
                # inside a stratum of m images the bootstrap's variance is (m - 1) / m of the sampling variance:
                # widen the spread by the smallest stratum's factor
                m = int(torch.bincount(strata_N).min())
                replicates_R = replicates_R.mean() + (replicates_R - replicates_R.mean()) * math.sqrt(m / (m - 1))
            self._cache[key] = replicates_R
        return self._cache[key]

    def fid(self, features: dict[str, Tensor], *, all_metrics: bool = False, start: int = 0) -> FidScore:
        """The FID with its interval at `level` and standard error; every metric of the evaluator too with
        `all_metrics` (IS, KID, precision/recall). `start`: the features are of images start.. of their candidate
        (the bootstrap's strata are those images' conditions)."""
        feats_NF = features[self.evaluator.feature_layer]
        metrics = self.evaluator.metrics_of(features, self.reference, None if all_metrics else ["fid"])
        fid = float(metrics.pop("fid"))
        replicates_R = self._replicates(feats_NF, start)
        low, high = normal_interval(fid, replicates_R, self.level)
        clip = None
        if self.clip:
            scores_N = features[CLIP_LAYER][:, 0].double()
            mean = float(scores_N.mean())
            clip = Interval(mean, *normal_interval(  # their spread / √N: the mean's se
                mean, scores_N / math.sqrt(len(scores_N)), self.level))
        return FidScore(fid, float(low), float(high), float(replicates_R.std()), clip,
                        {k: float(v) for k, v in metrics.items()})

    def difference(self, features_a: dict[str, Tensor], features_b: dict[str, Tensor], *,
                   start: int = 0) -> Difference:
        """FID(a) − FID(b) with its interval at `level` (bootstrap with the same resampled indices for both);
        `start` as in :meth:`fid`."""
        a_NF, b_NF = features_a[self.evaluator.feature_layer], features_b[self.evaluator.feature_layer]
        if a_NF.shape != b_NF.shape:
            raise ValueError(f"paired features must have one shape, got {tuple(a_NF.shape)} and {tuple(b_NF.shape)}")
        point = (self.evaluator.metrics_of(features_a, self.reference, ["fid"])["fid"]
                 - self.evaluator.metrics_of(features_b, self.reference, ["fid"])["fid"])
        diff_R = self._replicates(a_NF, start) - self._replicates(b_NF, start)
        low, high = normal_interval(point, diff_R, self.level)
        return Difference(float(point), float(low), float(high))



def scored_record(stage: str, job: Job, done: Done, bank: FeatureBank, scorer: Scorer, *,
                  all_metrics: bool = False) -> TrialRecord:
    """The record of a finished FID job: its features stored in `bank`, then the FID of the candidate's images
    0..N-1 (every metric with `all_metrics`); the value told to Optuna is the FID."""
    assert done.evaluation is not None
    features = bank.put(job, done.evaluation.features)
    score = scorer.fid(bank.get(job.candidate, job.num_images, scorer.layers), all_metrics=all_metrics)
    return TrialRecord.of(stage, job, done, value=score.fid, metrics=score.metrics(), features=features)
