"""Stage 2: confirm the proxy's best candidates with FID (multi-fidelity) and measure how well the proxy ranks.

The top-K *distinct* proxy candidates (equal after rounding the weights) and the baselines (the backbone's published
CFG weight and unguided sampling, w = 0) get a small-N FID; the `full_top` best of the guided ones and the unguided
baseline then get the full-N FID, so the best candidate and the unguided reference are compared at the same N.
Every FID evaluation is one trial of the ``confirm`` ledger study, so a resumed sweep redoes none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial
from scipy.stats import spearmanr

from pipeline.config import BackboneConfig, ConfirmConfig
from tuners.jobs import Job, Observer, Pool
from tuners.proxy import job_key
from tuners.space import Candidate, from_params
from tuners.studies import run_ledger

PROXY, DEFAULT, UNGUIDED = "proxy", "default", "unguided"


@dataclass
class Confirmed:
    """A confirmed candidate: where it came from, its proxy gap and its FID metrics at each fidelity."""

    candidate: Candidate
    role: str  # proxy | default | unguided
    gap: float
    small: dict[str, float] | None = None  # metrics at confirm.small_num_images
    full: dict[str, float] | None = None  # metrics at confirm.num_images

    @property
    def fid(self) -> float:
        """FID at the highest fidelity this candidate reached (NaN if none)."""
        metrics = self.full or self.small
        return metrics["fid"] if metrics else math.nan


def select_candidates(trials: list[FrozenTrial], top_k: int, decimals: int) -> list[tuple[Candidate, float]]:
    """The `top_k` lowest-gap COMPLETE proxy trials with distinct candidates (weights rounded to `decimals`)."""
    chosen: dict[tuple, tuple[Candidate, float]] = {}
    for trial in sorted(trials, key=lambda t: t.value if t.value is not None else math.inf):
        candidate = from_params(trial.params)
        key = candidate.key(decimals)
        if trial.value is not None and key not in chosen:
            chosen[key] = (candidate, trial.value)
        if len(chosen) == top_k:
            break
    return list(chosen.values())


def baselines(backbone: BackboneConfig) -> list[tuple[Candidate, str]]:
    """The published default (CFG at `backbone.default_cfg`) and unguided conditional sampling (w = 0)."""
    return [
        (Candidate(w_cfg=backbone.default_cfg, w_igg=None, window=None), DEFAULT),
        (Candidate(w_cfg=0.0, w_igg=None, window=None), UNGUIDED),
    ]


def spearman(gaps: list[float], fids: list[float]) -> float:
    """Spearman rank correlation of proxy gap vs FID; NaN with fewer than 3 finite pairs or a constant side."""
    pairs = [(g, f) for g, f in zip(gaps, fids, strict=True) if math.isfinite(g) and math.isfinite(f)]
    if len(pairs) < 3 or len({g for g, _ in pairs}) < 2 or len({f for _, f in pairs}) < 2:
        return math.nan
    rho = spearmanr([g for g, _ in pairs], [f for _, f in pairs]).statistic
    return float(rho)


def run_confirm(
    study: optuna.Study,
    pool: Pool,
    entries: list[Confirmed],
    confirm: ConfirmConfig,
    seed: int,
    observer: Observer,
) -> list[Confirmed]:
    """Small-N FID for every entry, full-N FID for the `full_top` best guided ones and the unguided baseline.

    Fills `small` and `full` of the entries in place (left None where an evaluation failed) and returns them.
    """

    def fid_jobs(chosen: list[Confirmed], n: int) -> dict[str, Job]:
        return {job_key(job): job for job in (Job(e.candidate, n, seed, fid=True) for e in chosen)}

    def metrics_of(trials: dict[str, FrozenTrial], entry: Confirmed, n: int) -> dict[str, float] | None:
        trial = trials.get(job_key(Job(entry.candidate, n, seed, fid=True)))
        return dict(trial.user_attrs["result"]["fid_metrics"]) if trial is not None else None

    def fid_of(ev):
        return ev.fid_metrics["fid"]

    small = run_ledger(study, pool, "confirm", fid_jobs(entries, confirm.small_num_images), fid_of, observer)
    for entry in entries:
        entry.small = metrics_of(small, entry, confirm.small_num_images)
    guided = sorted((e for e in entries if e.role != UNGUIDED and e.small), key=lambda e: e.fid)
    chosen = guided[: confirm.full_top] + [e for e in entries if e.role == UNGUIDED and e.small]
    if confirm.num_images == confirm.small_num_images:
        full = small
    else:
        full = run_ledger(study, pool, "confirm", fid_jobs(chosen, confirm.num_images), fid_of, observer)
    for entry in chosen:
        entry.full = metrics_of(full, entry, confirm.num_images)
    return entries


def best_of(entries: list[Confirmed]) -> Confirmed:
    """The lowest full-N FID (the lowest small-N FID if no entry reached full N)."""
    for fidelity in ("full", "small"):
        scored = [e for e in entries if getattr(e, fidelity)]
        if scored:
            return min(scored, key=lambda e: getattr(e, fidelity)["fid"])
    raise RuntimeError("no confirm evaluation finished; see the failed runs in MLflow, then rerun to resume")
