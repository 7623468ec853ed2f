"""Tuner logic on a synthetic backbone: the proxy, the FID refinement, the race, resume and stale trials.

The workers are an in-process stub (no model): the proxy signals are closed-form functions of the guidance strength
whose evenness and divergence cross at a known strength, and an FID job returns per-image features z_i + shift(c),
z_i drawn from (seed, i) alone (the same for two candidates on one seed), so the FID against a standard-normal
reference is about |shift(c)|², lowest at a known strength. FID itself is the real code: torch-fidelity through
FidEvaluator, the bootstrap of pipeline.core.metrics. Optuna storage is a real SQLite file in tmp_path.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from pipeline.config.schema import BackboneConfig, ConfirmConfig, ProxyConfig, RefineConfig, ScreenConfig, SearchConfig
from pipeline.core.seeds import derive_seed
from pipeline.fid.fidelity import FidEvaluator, Reference
from pipeline.outputs.publish import versus
from tuners.confirm import DEFAULT, REFINED, Racer, RaceStage, default_candidate
from tuners.jobs import Done, Evaluation, Job, TrialRecord
from tuners.proxy import ProxyStage, gap_name, gaps_of
from tuners.refine import Refined, RefineResult, RefineStage, Start
from tuners.samplers import make_sampler
from tuners.scoring import FeatureBank, FidScore, Interval, Scorer, candidate_seed, direction, heads_first
from tuners.screen import (
    Basin,
    Curve,
    Rho,
    ScreenPoint,
    ScreenResult,
    ScreenStage,
    curves_of,
    descend,
    spacing,
    total,
    totals,
)
from tuners.space import Candidate, Ranges, Region, design_points, from_params, suggest, trial_params
from tuners.studies import RECORD, fail_stale, job_key, open_study, record_of, study_name
from tuners.surrogate import log_weights, posterior_mean

optuna.logging.set_verbosity(optuna.logging.WARNING)

CROSSING = 4.5  # strength where |E - D| = 0
W_STAR = 9.0  # strength of the synthetic FID optimum: outside the starting range [0, 6] for CFG
F = 4  # feature dimension of the stub


def strength(c: Candidate) -> float:
    return (c.w_cfg or 0.0) + 0.5 * (c.w_igg or 0.0)


def features(job: Job) -> np.ndarray:
    """(sampled, F) features: z_i (from seed and image index only) shifted by the candidate's distance to W_STAR."""
    rows = []
    for i in range(job.start, job.num_images):
        z = torch.randn(F, generator=torch.Generator().manual_seed(derive_seed(job.seed, 10_000 + i)))
        rows.append(z.numpy())
    shift = np.zeros(F, dtype=np.float32)
    shift[0] = strength(job.candidate) - W_STAR
    return (np.stack(rows) + shift).astype(np.float32)


def synthetic(job: Job) -> Evaluation:
    s = strength(job.candidate)
    signals = {"vocab_evenness": 0.5 - 0.05 * s, "token_evenness": 0.9 - 0.001 * s,
               "div_uncond": 0.05 + 0.05 * s, "div_cond": 0.02 + 0.01 * s}
    return Evaluation(signals=signals, per_scale={k: [v, v] for k, v in signals.items()},
                      features={"features": features(job)} if job.fid else {}, num_images=job.sampled, wall_s=0.1)


class StubPool:
    """`workers` in-process workers; jobs finish in submission order (or last-first with `lifo`).

    `crash_after`: the driver dies (KeyboardInterrupt) when waiting for the job after that many finished ones.
    """

    def __init__(self, workers: int = 2, lifo: bool = False, fail_if=None, crash_after: int | None = None,
                 evaluate=synthetic):
        self.workers, self.lifo, self.fail_if, self.crash_after = workers, lifo, fail_if, crash_after
        self.evaluate = evaluate
        self.queue: deque[tuple[int, Job]] = deque()
        self.seen: list[Job] = []
        self.max_pending = 0

    def idle(self) -> int:
        return self.workers - len(self.queue)

    def pending(self) -> int:
        return len(self.queue)

    def submit(self, tag: int, job: Job) -> None:
        assert self.idle() > 0, "submitted to a busy pool"
        self.queue.append((tag, job))
        self.seen.append(job)
        self.max_pending = max(self.max_pending, len(self.queue))

    def wait(self) -> Done:
        if self.crash_after is not None and len(self.seen) - len(self.queue) >= self.crash_after:
            raise KeyboardInterrupt
        tag, job = self.queue.pop() if self.lifo else self.queue.popleft()
        if self.fail_if is not None and self.fail_if(job):
            return Done(tag, None, "worker raised: boom", retries=1)
        return Done(tag, self.evaluate(job), None, retries=0)


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, str, int]] = []

    def started(self, stage, number, job):
        self.events.append(("started", stage, number))

    def finished(self, stage, number, job, done, metrics):
        assert all(isinstance(v, float) for v in metrics.values())
        self.events.append(("finished", stage, number))

    def failed(self, stage, number, job, reason, retries):
        self.events.append(("failed", stage, number))


SEARCH = SearchConfig(n_trials=12, n_startup_trials=4, w_cfg=[0.0, 6.0], w_igg=[0.0, 6.0], windows=[None, 3])
PROXY = ProxyConfig(num_images=4, design=[0.5, 1.0])
REFINE = RefineConfig(n_trials=8, num_images=16)
CONFIRM = ConfirmConfig(finalists=3, rungs=[32, 64], final_max=2, bootstrap=100, batch_size=16)


def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/optuna.db"


def proxy_stage(tmp_path, kinds=("cfg",), search=SEARCH, name="s") -> ProxyStage:
    study = open_study(storage(tmp_path), study_name(name, "proxy"))
    return ProxyStage(study, list(kinds), search, PROXY, 0, Recorder())


@pytest.fixture(scope="module")
def scorer():
    evaluator = FidEvaluator("guidetune-tiny", metrics=["fid"], progress=False)
    ref = torch.randn(512, F, generator=torch.Generator().manual_seed(1))
    reference = Reference(np.zeros(F), np.eye(F), ref, 512, "stub")
    return Scorer(evaluator, reference, replicates=100, level=0.95, seed=0)


def bank(tmp_path) -> FeatureBank:
    return FeatureBank(tmp_path / "features", [0, REFINE.num_images, *CONFIRM.rungs], 0)


# ------------------------------------------------------------------------------------------------- space


def test_candidate_kind_key_and_weights():
    assert [Candidate(1.0, None, None).kind, Candidate(None, 1.0, 3).kind, Candidate(1.0, 2.0, None).kind,
            Candidate(None, None, None).kind] == ["cfg", "igg", "mixed", "unguided"]
    assert Candidate(1.234, None, None).key(2) == Candidate(1.2349, None, None).key(2)
    assert Candidate(1.234, 2.0, 3).key(2) != Candidate(1.234, 2.0, 5).key(2)
    assert Candidate(1.0, None, 3).key(1) == Candidate(1.0, None, None).key(1)
    assert Candidate(1.0, 2.0, 3).weights() == {"w_cfg": 1.0, "w_igg": 2.0}


def test_design_points_per_kind():
    ranges = Ranges.start(["cfg", "mixed"], SearchConfig(w_cfg=[1.0, 5.0], w_igg=[0.0, 2.0]))
    assert design_points(["cfg", "mixed"], ranges, [1.0, 0.5, 0.5]) == [
        Candidate(3.0, None, None), Candidate(5.0, None, None), Candidate(3.0, 1.0, None), Candidate(5.0, 2.0, None)]


def test_suggest_only_the_kind_parameters_inside_the_box():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    box = {"w_cfg": (1.0, 2.0), "w_igg": (3.0, 4.0)}
    for kind, names in (("cfg", {"w_cfg"}), ("igg", {"w_igg", "window"}), ("mixed", {"w_cfg", "w_igg", "window"})):
        trial = study.ask()
        c = suggest(trial, kind, box, [None, 5])
        assert set(trial.params) == names and c.kind == kind
        assert c.w_cfg is None or 1.0 <= c.w_cfg <= 2.0
        assert c.w_igg is None or 3.0 <= c.w_igg <= 4.0
        assert c.window in (None, 5)


def test_an_interval_is_a_categorical_that_round_trips():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    intervals = [(0, None), (2, None), (2, 5)]
    asked = set()
    for _ in range(12):
        trial = study.ask()
        c = suggest(trial, "cfg", {"w_cfg": (1.0, 2.0)}, [None], intervals=intervals)
        assert c.interval in intervals and set(trial.params) == {"w_cfg", "interval"}
        assert from_params(trial.params) == c
        asked.add(c.interval)
        study.tell(trial, 1.0)
    assert asked == set(intervals)
    c = Candidate(None, 3.0, 5, interval=(2, 5))
    study.enqueue_trial({"kind": "igg", **trial_params(c)})  # asked again exactly (the refine's warm start)
    trial = study.ask()
    trial.suggest_categorical("kind", ["igg"])
    assert suggest(trial, "igg", {"w_igg": (1.0, 4.0)}, [None, 5], intervals=intervals) == c
    assert Candidate(3.0, None, None, interval=[2, None]).interval == (2, None)  # as a stored record holds it
    assert "scales 2:5" in c.label() and c.as_dict()["interval"] == [2, 5]
    assert c.key(2) != Candidate(None, 3.0, 5).key(2) and "interval" not in Candidate(None, 3.0, 5).as_dict()


def test_ranges_grow_at_the_edge_up_to_the_cap():
    ranges = Ranges.start(["mixed"], SearchConfig(w_cfg=[0.0, 6.0], w_igg=[0.0, 6.0], max_weight=20.0))
    assert ranges.widen(Candidate(3.0, 5.9, None)) == ["w_igg"]
    assert ranges.spans["mixed"] == {"w_cfg": [0.0, 6.0], "w_igg": [0.0, 12.0]}
    assert ranges.widen(Candidate(3.0, 5.9, None)) == []  # no longer at the edge
    ranges.widen(Candidate(3.0, 12.0, None))
    assert ranges.spans["mixed"]["w_igg"] == [0.0, 20.0]  # capped
    assert ranges.widen(Candidate(3.0, 20.0, None)) == []
    assert ranges.bounds(Candidate(0.0, 20.0, None)) == {"w_cfg": "low", "w_igg": "cap"}
    # the published default CFG can win the race of an IGG sweep: a kind that was not searched has no range
    assert ranges.bounds(Candidate(1.5, None, None)) == {"w_cfg": "inside"}
    assert ranges.bounds(Candidate(20.0, None, None)) == {"w_cfg": "cap"}


def test_region_moves_grows_and_shrinks_in_log_weight():
    def box_of(centre: float, r: float) -> tuple[float, float]:
        return (math.expm1(math.log1p(centre) - r), math.expm1(math.log1p(centre) + r))

    region = Region({"w_cfg": 3.0}, {"w_cfg": 0.5}, cap=20.0, floor=0.25)
    assert region.box()["w_cfg"] == pytest.approx(box_of(3.0, 0.5))  # (1.43, 5.59): a multiplicative box
    top = region.box()["w_cfg"][1]
    region.update(Candidate(top * 0.97, None, None), True, edge=0.1, grow=2.0, shrink=0.5)
    assert region.history == ["grew"] and region.direction == {"w_cfg": 1} and region.radius == {"w_cfg": 1.0}
    probe = region.probe()  # half the radius before the growth on, in log(1 + w)
    assert probe is not None and math.log1p(probe.w_cfg) == pytest.approx(math.log1p(top * 0.97) + 0.25)
    region.update(Candidate(top * 0.97, None, None), False, edge=0.1, grow=2.0, shrink=0.5)
    assert region.radius == {"w_cfg": 0.5} and region.history == ["grew", "shrank"] and region.probe() is None
    region.update(Candidate(18.0, None, None), True, edge=0.1, grow=2.0, shrink=0.5)  # beyond the old box
    assert region.history[-1] == "grew" and region.box()["w_cfg"][1] == 20.0  # clipped at the cap
    region.update(Candidate(19.9, None, None), True, edge=0.1, grow=2.0, shrink=0.5)
    assert region.history[-1] == "kept"  # the cap is no edge to grow at
    low = Region({"w_igg": 0.3}, {"w_igg": 1.0}, cap=20.0, floor=0.25)
    assert low.box()["w_igg"][0] == 0.25  # never below the floor, which is no edge either
    low.update(Candidate(None, 0.26, None), True, edge=0.1, grow=2.0, shrink=0.5)
    assert low.history == ["kept"]


def test_refined_weights_are_sampled_in_log_scale_inside_the_box():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    box = {"w_igg": (0.5, 32.0)}
    picks = [suggest(study.ask(), "igg", box, [None], log=True).w_igg for _ in range(400)]
    assert all(0.5 <= w <= 32.0 for w in picks)
    below_4 = sum(w < 4.0 for w in picks) / len(picks)  # log-uniform: half the mass below sqrt(0.5 * 32) = 4
    assert 0.42 < below_4 < 0.58


# ------------------------------------------------------------------------------------------------- proxy


def test_gap_is_in_natural_units():
    gaps = gaps_of(synthetic(Job(Candidate(1.5, None, None), 4, 0)).signals)
    assert gaps[gap_name("vocab", "uncond")] == pytest.approx(abs(0.5 - 0.075 - 0.125))
    assert set(gaps) == {gap_name(e, r) for e in ("vocab", "tokens") for r in ("uncond", "cond")}


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_proxy_finds_the_crossing_of_every_kind_and_grows_a_range(tmp_path, sampler):
    search = SearchConfig(**{**SEARCH.__dict__, "sampler": sampler, "n_trials": 30})
    stage = proxy_stage(tmp_path, ("cfg", "igg"), search)
    pool = StubPool()
    stage.run(pool)
    assert pool.max_pending == 2
    ((cfg_best, _),) = stage.best("cfg", 1, 2)
    ((igg_best, _),) = stage.best("igg", 1, 2)
    assert cfg_best.w_cfg == pytest.approx(CROSSING, abs=0.6)
    assert igg_best.w_igg == pytest.approx(2 * CROSSING, abs=1.2)  # beyond the starting range: it grew
    assert stage.ranges.spans["igg"]["w_igg"][1] > 6.0 and stage.state.grows >= 1
    assert stage.ranges.spans["cfg"]["w_cfg"] == [0.0, 6.0]
    rec = record_of(stage.study.trials[0])
    assert rec.stage == "proxy" and rec.value == pytest.approx(rec.gaps["gap_vocab_uncond"])


def test_proxy_pick_does_not_move_with_the_range(tmp_path):
    picks = []
    for name, high in (("narrow", 6.0), ("wide", 12.0)):
        search = SearchConfig(**{**SEARCH.__dict__, "w_cfg": [0.0, high], "n_trials": 16, "max_grows": 0})
        stage = proxy_stage(tmp_path, ("cfg",), search, name=name)
        stage.run(StubPool())
        picks.append(stage.best("cfg", 1, 2)[0][0].w_cfg)
    assert picks[0] == pytest.approx(CROSSING, abs=0.5) and picks[1] == pytest.approx(CROSSING, abs=0.5)


def proxy_history(study) -> list[tuple]:
    """(params, gap) of the budget-using trials in ask order (re-asked duplicates of interrupted trials excluded)."""
    kept = [t for t in sorted(study.trials, key=lambda t: t.number) if RECORD in t.user_attrs]
    return [(sorted(t.params.items(), key=str), t.value) for t in kept]


def test_completion_order_does_not_change_the_proxy_search(tmp_path):
    histories = []
    for name, pool in (("fifo", StubPool(workers=3)), ("lifo", StubPool(workers=3, lifo=True))):
        stage = proxy_stage(tmp_path, ("cfg",), name=name)
        stage.run(pool)
        histories.append(proxy_history(stage.study))
    assert len(histories[0]) >= 14 and histories[0] == histories[1]


@pytest.mark.parametrize("crash_after", [1, 7])
def test_killed_proxy_resumes_to_the_uninterrupted_result(tmp_path, crash_after):
    whole = proxy_stage(tmp_path, name="whole")
    whole.run(StubPool(lifo=True))
    killed = proxy_stage(tmp_path, name="killed")
    with pytest.raises(KeyboardInterrupt):
        killed.run(StubPool(lifo=True, crash_after=crash_after))
    told_before = [t.number for t in killed.study.trials if t.state == TrialState.COMPLETE]
    again_stage = proxy_stage(tmp_path, name="killed")  # the same command again
    again = StubPool(lifo=True)
    again_stage.run(again)
    trials = again_stage.study.trials
    assert all(trials[n].state == TrialState.COMPLETE for n in told_before)  # kept
    assert len(again.seen) == len(proxy_history(whole.study)) - len(told_before)  # nothing told is run twice
    interrupted = [t for t in trials if t.state == TrialState.FAIL and RECORD not in t.user_attrs]
    assert interrupted
    assert proxy_history(again_stage.study) == proxy_history(whole.study)


def test_worker_errors_fail_the_trial_with_reason_and_use_budget(tmp_path):
    search = SearchConfig(**{**SEARCH.__dict__, "sampler": "random", "n_trials": 10, "max_grows": 0})
    stage = proxy_stage(tmp_path, search=search)
    pool = StubPool(fail_if=lambda job: job.candidate.w_cfg > 4.0)
    stage.run(pool)
    failed = stage.study.get_trials(states=(TrialState.FAIL,))
    assert failed and all(record_of(t).error == "worker raised: boom" and record_of(t).retries == 1 for t in failed)
    assert len(pool.seen) == 12  # 2 design points + 10 trials
    assert sum(e[0] == "failed" for e in stage.observer.events) == len(failed)


def test_interrupted_trials_are_failed_and_reasked(tmp_path):
    study = open_study(storage(tmp_path), study_name("s", "proxy"))
    dead = study.ask()  # a driver asked, then died before telling
    dead.suggest_float("w_cfg", 0, 6)
    assert fail_stale(study) == [dead.params]
    assert study.trials[0].state == TrialState.FAIL and fail_stale(study) == []


# ------------------------------------------------------------------------------------------- surrogate


def test_surrogate_interpolates_noise_free_observations():
    u_N1 = log_weights(torch.tensor([[1.0], [4.0], [9.0], [16.0]]))
    y_N = torch.tensor([2.5, 2.1, 2.0, 2.3], dtype=torch.float64)
    mean_N = posterior_mean(u_N1, torch.zeros(4), y_N, torch.full((4,), 1e-12), lengthscale=0.3, kinship=0.5)
    torch.testing.assert_close(mean_N, y_N, atol=1e-6, rtol=0)


def test_surrogate_at_one_point_is_the_conjugate_normal_update():
    # Repeated trials of one candidate: f ~ N(m, s²), y_i = f + e_i, e_i ~ N(0, v_i); the posterior mean of f is
    # (m / s² + Σ y_i / v_i) / (1 / s² + Σ 1 / v_i), with m and s² as the module defines them.
    y_N = torch.tensor([2.0, 2.4, 2.9, 2.2], dtype=torch.float64)
    var_N = torch.tensor([0.01, 0.04, 0.09, 0.02], dtype=torch.float64)
    m, s2 = y_N.mean(), max(y_N.var(unbiased=False) - var_N.mean(), var_N.mean())
    expected = (m / s2 + (y_N / var_N).sum()) / (1 / s2 + (1 / var_N).sum())
    mean_N = posterior_mean(torch.ones(4, 1), torch.zeros(4), y_N, var_N, lengthscale=0.3, kinship=0.5)
    torch.testing.assert_close(mean_N, expected.expand(4), atol=1e-9, rtol=0)


def test_surrogate_ranks_a_consistent_region_above_a_lone_lucky_draw():
    # a lone low draw among poor neighbours (w = 2..4) vs a region that is good at every trial (w = 12..20)
    w_N1 = torch.tensor([[2.0], [2.5], [3.0], [3.5], [4.0], [12.0], [14.0], [17.0], [20.0]])
    fid_N = torch.tensor([11.0, 10.5, 6.5, 10.8, 11.2, 7.6, 7.4, 7.7, 7.5], dtype=torch.float64)
    rel_se = 0.13
    mean_N = posterior_mean(log_weights(w_N1), torch.zeros(9), fid_N.log(), torch.full((9,), rel_se ** 2),
                            lengthscale=0.3, kinship=0.5)
    assert int(fid_N.argmin()) == 2 and int(mean_N.argmin()) in (5, 6, 7, 8)


def test_surrogate_shares_evidence_between_windows_by_kinship():
    # the same weights, two windows: with kinship 0 the window-3 trial keeps its own value, with 1 it is pooled
    u_N1 = torch.zeros(3, 1)
    window_N = torch.tensor([-1, -1, 3])
    y_N = torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64)
    var_N = torch.full((3,), 0.01, dtype=torch.float64)
    apart = posterior_mean(u_N1, window_N, y_N, var_N, lengthscale=0.3, kinship=0.0)
    pooled = posterior_mean(u_N1, window_N, y_N, var_N, lengthscale=0.3, kinship=1.0)
    assert apart[2] > pooled[2] and abs(float(pooled[2] - pooled[0])) < 1e-9
    with pytest.raises(ValueError, match="kinship"):
        posterior_mean(u_N1, window_N, y_N, var_N, lengthscale=0.3, kinship=1.5)


# ----------------------------------------------------------------------------------------- refine and race


def refine_stage(tmp_path, scorer, kinds=("cfg", "igg"), name="s", refine=REFINE, starts=None) -> RefineStage:
    ranges = Ranges.start(list(kinds), SEARCH)
    starts = starts or {f"{k}-0": Start(k, design_points([k], ranges, [0.5])[0], 0.9) for k in kinds}
    studies = {r: open_study(storage(tmp_path), study_name(name, f"refine/{r}")) for r in starts}
    return RefineStage(studies, starts, refine, SEARCH, 0, Recorder(), bank(tmp_path / name), scorer)


def refine_history(stage: RefineStage) -> dict[str, list]:
    return {k: [(sorted(t.params.items(), key=str), t.value) for t in s.counted()] for k, s in stage.regions.items()}


def test_refinement_leaves_the_starting_range_for_the_optimum(tmp_path, scorer):
    stage = refine_stage(tmp_path, scorer)
    pool = StubPool()
    result = stage.run(pool)
    assert all(j.fid and j.num_images == REFINE.num_images for j in pool.seen)
    best_cfg = stage.regions["cfg-0"].best[0]
    best_igg = stage.regions["igg-0"].best[0]
    assert best_cfg.w_cfg > 6.0 and abs(strength(best_cfg) - W_STAR) < 1.5  # beyond the starting [0, 6]
    assert abs(strength(best_igg) - W_STAR) < 3.0
    assert "grew" in stage.history()["cfg-0"]
    assert all(len(s.counted()) == REFINE.n_trials for s in stage.regions.values())
    finalists = result.finalists(3, 2, 0.0)
    assert {r.candidate.kind for r in finalists[:2]} == {"cfg", "igg"} and len(finalists) == 3
    assert finalists[0].smoothed <= finalists[1].smoothed  # each kind's best by smoothed FID, best kind first
    assert {r.candidate for r in finalists[:2]} == {best_cfg, best_igg}
    assert {r.region for r in finalists[:2]} == {"cfg-0", "igg-0"}
    rec = finalists[0].record
    assert rec.metrics["fid_low"] < rec.metrics["fid"] < rec.metrics["fid_high"] and rec.images == REFINE.num_images


def test_every_refined_region_gets_a_finalist_before_any_gets_a_second():
    """Three regions (two of IGG): a region whose best ranks below two other regions' seconds still gets a finalist,
    and the kinds' bests come first (session 11's tiny s0: the IGG basin at w'≈9.6 sent nobody to the race)."""
    def refined(kind: str, w: float, smoothed: float, region: str) -> Refined:
        candidate = Candidate(w_cfg=w if kind == "mixed" else None, w_igg=w, window=None)
        record = TrialRecord("refine", kind, {}, 512, 0, 0, value=smoothed)
        return Refined(candidate, record, smoothed, region)

    scored = [refined("igg", 20.7, 8.0, "igg-0"), refined("igg", 17.4, 8.1, "igg-0"),
              refined("mixed", 7.1, 8.2, "mixed-0"), refined("mixed", 5.4, 8.3, "mixed-0"),
              refined("mixed", 10.4, 8.4, "mixed-0"), refined("igg", 9.6, 8.6, "igg-1")]
    result = RefineResult(scored, {})
    chosen = result.finalists(4, 2, 0.0)
    assert [r.region for r in chosen] == ["igg-0", "mixed-0", "igg-1", "igg-0"]
    assert [r.smoothed for r in chosen] == [8.0, 8.2, 8.6, 8.1]
    assert [r.region for r in result.finalists(2, 2, 0.0)] == ["igg-0", "mixed-0"]  # kinds before regions
    assert len(result.finalists(10, 2, 0.0)) == len(scored)


def test_finalists_skip_near_neighbours_of_a_chosen_one(tmp_path, scorer):
    stage = refine_stage(tmp_path, scorer)
    result = stage.run(StubPool())
    every = result.finalists(16, 2, 0.0)
    apart = result.finalists(16, 2, 0.3)
    assert apart[0] == every[0] and len(apart) < len(every)

    def u(c: Candidate) -> list[float]:
        return log_weights(torch.tensor(list(c.weights().values()))).tolist()

    chosen = [r.candidate for r in apart]
    for i, a in enumerate(chosen):
        for b in chosen[:i]:
            assert a.kind != b.kind or a.window != b.window or math.dist(u(a), u(b)) >= 0.3
    skipped = [r.candidate for r in every if r.candidate not in chosen]
    assert skipped and all(any(c.kind == a.kind and c.window == a.window and math.dist(u(c), u(a)) < 0.3
                               for a in chosen) for c in skipped)


def test_each_candidate_draws_its_own_images_unless_common():
    a, b = Candidate(9.0, None, None), Candidate(9.0, 1.0, None)
    assert candidate_seed(5, a, common=False) == candidate_seed(5, Candidate(9.0, None, None), common=False)
    assert len({candidate_seed(5, c, common=False) for c in (a, b, Candidate(9.0, 1.0, 3))}) == 3
    assert candidate_seed(5, a, common=False) != candidate_seed(6, a, common=False)
    assert candidate_seed(5, a, common=True) == candidate_seed(5, b, common=True) == 5
    # a candidate without an interval keeps the seed it always had; another interval draws other images
    assert candidate_seed(5, a, common=False) == derive_seed(5, int(hashlib.sha256(b"[9.0, null, null]").hexdigest()
                                                                    [:15], 16))
    assert candidate_seed(5, Candidate(9.0, None, None, interval=(2, None)), common=False) != candidate_seed(
        5, a, common=False)


def test_refinement_is_reproducible_and_resumes(tmp_path, scorer):
    whole = refine_stage(tmp_path, scorer, name="whole")
    whole.run(StubPool(lifo=True))
    killed = refine_stage(tmp_path, scorer, name="killed")
    with pytest.raises(KeyboardInterrupt):
        killed.run(StubPool(crash_after=5))
    again = refine_stage(tmp_path, scorer, name="killed")
    pool = StubPool()
    again.run(pool)
    assert refine_history(again) == refine_history(whole)
    told = sum(len(s.counted()) for s in again.regions.values())
    assert len(pool.seen) < told  # what was told before the kill is not run again


def race_stage(tmp_path, scorer, racers, name="race", **confirm) -> RaceStage:
    study = open_study(storage(tmp_path), study_name(name, "confirm"))
    return RaceStage(study, racers, replace(CONFIRM, **confirm), Recorder(), bank(tmp_path), scorer)


def test_race_extends_images_eliminates_the_worse_and_measures_the_margin(tmp_path, scorer):
    near, other, far = Candidate(9.0, None, None), Candidate(9.2, None, None), Candidate(1.5, None, None)
    b = bank(tmp_path)
    for c in (near, other):  # refined candidates already hold their first block, on their own seeds
        job = Job(c, REFINE.num_images, b.seed_of(c), fid=True)
        b.put(job, {"features": features(job)})
    racers = [Racer(near, REFINED), Racer(other, REFINED), Racer(far, DEFAULT)]
    pool = StubPool()
    race = race_stage(tmp_path, scorer, racers, holdout=False).run(pool)
    winner, margin = race.winner, race.margin
    assert winner.candidate == near and winner.holdout is None
    assert pool.seen[0].candidate == far  # the longest job of a rung goes first (the others extend their images)
    starts = {(j.candidate, j.num_images): j.start for j in pool.seen}
    assert starts[(near, 32)] == 16 and starts[(far, 32)] == 0 and starts[(near, 64)] == 32  # only new images
    assert racers[2].left.startswith("worse at N=32") and racers[2].reached == 32
    assert margin is not None and margin.runner_up.candidate == other and margin.num_images == 64
    assert margin.diff > 0 and margin.low <= margin.diff <= margin.high and not margin.separated
    s = winner.scores[64]
    assert s.fid_low < s.fid < s.fid_high
    # the FID at N of the chained blocks equals the FID of one job of N images
    whole = {"features": torch.from_numpy(features(Job(near, 64, b.seed_of(near), fid=True)))}
    assert s.fid == pytest.approx(scorer.fid(whole).fid, rel=1e-9)
    again = StubPool()
    winner2 = race_stage(tmp_path, scorer, [Racer(near, REFINED), Racer(other, REFINED), Racer(far, DEFAULT)],
                         holdout=False).run(again).winner
    assert again.seen == [] and winner2.scores == winner.scores  # resumed from the ledger: nothing redone


def lucky_first(lucky: Candidate, until: int, shift: float):
    """A pool's evaluation where `lucky`'s images below `until` sit `shift` nearer the optimum than its others:
    the draws that chose it flatter it."""
    def evaluate(job: Job) -> Evaluation:
        out = synthetic(job)
        if job.candidate == lucky:
            rows = out.features["features"]
            rows[: max(0, until - job.start), 0] -= shift
        return out
    return evaluate


def test_the_last_rung_decides_on_hold_out_images_not_on_those_that_chose_the_finalists(tmp_path, scorer):
    # `lucky` is worse than `honest` (farther from W_STAR), but its first 32 images drew near the optimum
    # (not separated at N=32, so both reach the last rung)
    honest, lucky = Candidate(W_STAR + 1.0, None, None), Candidate(W_STAR + 1.2, None, None)
    evaluate = lucky_first(lucky, 32, 1.0)
    flattered = race_stage(tmp_path / "all", scorer, [Racer(honest, REFINED), Racer(lucky, REFINED)],
                           holdout=False).run(StubPool(evaluate=evaluate))
    assert flattered.winner.candidate == lucky  # on all its images the luck of the first half carries it
    pool = StubPool(evaluate=evaluate)
    race = race_stage(tmp_path / "held", scorer, [Racer(honest, REFINED), Racer(lucky, REFINED)]).run(pool)
    winner, margin = race.winner, race.margin
    assert winner.candidate == honest and winner.holdout is not None
    assert (winner.holdout.start, winner.holdout.end, winner.holdout.num_images) == (32, 64, 32)
    # the hold-out FID is the FID of exactly the images the last rung added, with their strata
    added = {"features": torch.from_numpy(features(Job(honest, 64, bank(tmp_path).seed_of(honest), fid=True,
                                                       start=32)))}
    assert winner.fid == pytest.approx(scorer.fid(added, start=32).fid, rel=1e-9) == winner.final.fid
    assert winner.scores[64].fid != winner.fid  # its FID on all 64 images is still reported beside it
    assert margin is not None and margin.runner_up.candidate == lucky and (margin.start, margin.num_images) == (32, 32)
    assert margin.diff == pytest.approx(margin.runner_up.fid - winner.fid, rel=1e-9)
    assert [j.start for j in pool.seen if j.num_images == 64] == [32, 32]  # no image is drawn twice


def test_a_one_rung_race_holds_out_the_same_images_of_every_finalist(tmp_path, scorer):
    refined, default = Candidate(9.0, None, None), Candidate(9.3, None, None)
    b = bank(tmp_path)
    job = Job(refined, REFINE.num_images, b.seed_of(refined), fid=True)  # the refined one holds images 0..15
    b.put(job, {"features": features(job)})
    result = race_stage(tmp_path, scorer, [Racer(refined, REFINED), Racer(default, DEFAULT)], rungs=[64]).run(
        StubPool())
    assert {(r.holdout.start, r.holdout.end) for r in result.racers} == {(16, 64)}  # the default's 0..15 too
    assert result.margin is not None and (result.margin.start, result.margin.num_images) == (16, 48)


@pytest.mark.parametrize(("stop", "holdout"), [(True, True), (True, False), (False, True)])
def test_a_race_left_with_one_finalist_is_decided(tmp_path, scorer, stop, holdout):
    best, worse = Candidate(9.0, None, None), Candidate(1.5, None, None)
    race = race_stage(tmp_path, scorer, [Racer(best, REFINED), Racer(worse, DEFAULT)], stop_when_decided=stop,
                      holdout=holdout)
    pool = StubPool()
    result = race.run(pool)
    winner, margin = result.winner, result.margin
    assert winner.candidate == best and margin is not None and margin.separated and margin.num_images == 32
    assert margin.start == 0  # the loser left at N=32: the margin is on the first 32 images of both
    if stop and not holdout:  # the default left at the first rung: nothing more is sampled, FID at N=32
        assert race.decided_at == 32 and winner.reached == 32 and max(j.num_images for j in pool.seen) == 32
        s = winner.scores[32]
        assert s.fid_low < s.fid < s.fid_high and s.fid_se > 0
    elif stop:  # decided at N=32: only the winner goes on, to its hold-out images
        assert race.decided_at == 32 and [(j.candidate, j.start) for j in pool.seen if j.num_images == 64] == [
            (best, 32)]
        assert winner.holdout is not None and winner.holdout.start == 32 and winner.fid == winner.holdout.score.fid
    else:
        assert race.decided_at is None and winner.reached == 64


def test_the_cost_cap_keeps_each_regions_best_before_a_second_from_any(tmp_path, scorer):
    # region a holds the two lowest FIDs, b a worse one that is not separated from them at N=32
    a1, a2, b1 = Candidate(W_STAR, None, None), Candidate(W_STAR + 0.1, None, None), Candidate(W_STAR + 0.4, None, None)
    racers = [Racer(a1, REFINED, region="cfg-0"), Racer(a2, REFINED, region="cfg-0"),
              Racer(b1, REFINED, region="cfg-1")]
    race = race_stage(tmp_path, scorer, racers, final_max=2)
    race.run(StubPool())
    assert max(racers[:2], key=lambda r: r.scores[32].fid).left.startswith("cut at N=32 by the cost cap")
    assert racers[2].reached == 64 and racers[2].left is None
    assert sorted(r.scores[32].fid for r in racers)[1] < racers[2].scores[32].fid  # it went on as b's best


def test_bootstrap_replicates_are_computed_once_per_features(scorer):
    from pipeline.core.metrics import bootstrap_fid, resample_counts
    x = torch.from_numpy(features(Job(Candidate(8.0, None, None), 64, 3, fid=True)))
    first = scorer._replicates(x, 0)
    assert scorer._replicates(x.clone(), 0) is first  # the same features: the cached replicates
    mu, sigma = torch.from_numpy(scorer.reference.mu), torch.from_numpy(scorer.reference.sigma)

    def counts(n: int, start: int = 0) -> torch.Tensor:  # resamples of images start..start+n-1: seeded by the end
        return resample_counts(n, scorer.replicates, derive_seed(0, start + n))

    assert torch.equal(first, bootstrap_fid(x, mu, sigma, counts(64)))
    other = scorer._replicates(x[:48], 0)  # other features: their own replicates
    assert other is not first and torch.equal(other, bootstrap_fid(x[:48], mu, sigma, counts(48)))
    later = scorer._replicates(x, 16)  # the same features as images 16..79: other resamples
    assert later is not first and torch.equal(later, bootstrap_fid(x, mu, sigma, counts(64, 16)))


def test_a_scorer_with_conditions_resamples_inside_each(scorer):
    from dataclasses import replace

    from pipeline.core.metrics import bootstrap_fid, resample_counts
    from pipeline.core.sampling import spread_labels
    x = torch.from_numpy(features(Job(Candidate(8.0, None, None), 64, 3, fid=True)))
    strat = replace(scorer, conditions=8)  # 8 images per condition: stratified, widened by sqrt(8 / 7)
    mu, sigma = torch.from_numpy(scorer.reference.mu), torch.from_numpy(scorer.reference.sigma)
    inside = bootstrap_fid(x, mu, sigma, resample_counts(64, scorer.replicates, derive_seed(0, 64),
                                                          spread_labels(64, 8)))
    reps = strat._replicates(x, 0)
    assert torch.allclose(reps - reps.mean(), (inside - inside.mean()) * math.sqrt(8 / 7))
    # images 5..68: each stratum is their own conditions, not those of images 0..63
    later = bootstrap_fid(x, mu, sigma, resample_counts(64, scorer.replicates, derive_seed(0, 69),
                                                         spread_labels(69, 8)[5:]))
    held = strat._replicates(x, 5)
    assert torch.allclose(held - held.mean(), (later - later.mean()) * math.sqrt(8 / 7))
    assert not torch.allclose(held, reps)
    se = strat.fid({scorer.evaluator.feature_layer: x}).fid_se
    assert se == pytest.approx(float(inside.std()) * math.sqrt(8 / 7), rel=1e-9)
    few = replace(scorer, conditions=40)  # fewer than 2 images per condition: the plain bootstrap
    assert torch.equal(few._replicates(x, 0), bootstrap_fid(x, mu, sigma, resample_counts(64, scorer.replicates,
                                                                                      derive_seed(0, 64))))


def test_common_random_numbers_shrink_the_noise_of_a_difference(scorer):
    a, b = Candidate(8.0, None, None), Candidate(8.5, None, None)
    paired = scorer.difference(*({"features": torch.from_numpy(features(Job(c, 256, 0, fid=True)))} for c in (a, b)))
    unpaired_b = {"features": torch.from_numpy(features(Job(b, 256, 7, fid=True)))}
    unpaired = scorer.difference({"features": torch.from_numpy(features(Job(a, 256, 0, fid=True)))}, unpaired_b)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)


def test_a_stale_confirm_job_is_redone(tmp_path, scorer):
    c = Candidate(9.0, None, None)
    study = open_study(storage(tmp_path), study_name("race", "confirm"))
    dead = study.ask()
    dead.set_user_attr("job", job_key(Job(c, 32, bank(tmp_path).seed_of(c), fid=True, start=0)))
    pool = StubPool()
    race = RaceStage(study, [Racer(c, REFINED)], ConfirmConfig(**{**CONFIRM.__dict__, "rungs": [32]}),
                     Recorder(), bank(tmp_path), scorer)
    result = race.run(pool)
    winner, margin = result.winner, result.margin
    assert study.trials[0].state == TrialState.FAIL and RECORD not in study.trials[0].user_attrs
    assert len(pool.seen) == 1 and margin is None and math.isfinite(winner.fid)


def test_default_candidate():
    assert default_candidate(BackboneConfig(name="x", default_cfg=1.5)) == Candidate(1.5, None, None)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler='cma' is unknown"):
        make_sampler("cma", 0, 4)


def test_derive_seed_is_deterministic_and_distinct():
    seeds = {derive_seed(s, i) for s in range(3) for i in range(3)}
    assert len(seeds) == 9 and derive_seed(1, 2) == derive_seed(1, 2)


# ------------------------------------------------------------------------------------------------ screen

U_A, U_B = math.log1p(2.0), math.log1p(20.0)  # a shallow basin at w=2 and the deepest one at w=20, a hump between


def humped(job: Job) -> Evaluation:
    """The stub worker with a two-basin FID curve in u = log(1 + w): |shift| = min(1 + 2.5|u - u_A|, 2.5|u - u_B|)."""
    evaluation = synthetic(job)
    if job.fid:
        u = math.log1p(strength(job.candidate))
        base = features(Job(Candidate(W_STAR, None, None), job.num_images, job.seed, fid=True, start=job.start))
        base[:, 0] += min(1.0 + 2.5 * abs(u - U_A), 2.5 * abs(u - U_B))
        evaluation.features = {"features": base}
    return evaluation


SCREEN = ScreenConfig(points=9, rungs=[32, 64], keep=0.5, regions=3)


def screen_stage(tmp_path, scorer, name="screen", extra=(), config=SCREEN) -> ScreenStage:
    study = open_study(storage(tmp_path), study_name(name, "screen"))
    return ScreenStage(study, curves_of(["cfg"], [None], [0.5], None), totals(SCREEN.points, 0.25, 30.0),
                       list(extra), config, 0.5, gap_name("vocab", "uncond"), Recorder(), bank(tmp_path / name),
                       scorer)


def test_screen_points_are_evenly_spaced_in_log_weight_over_the_whole_range():
    ts = totals(10, 0.25, 30.0)
    assert ts[0] == 0.25 and ts[-1] == 30.0 and len(ts) == 10
    steps = np.diff(np.log1p(ts))
    assert np.allclose(steps, spacing(10, 0.25, 30.0)) and math.isclose(steps.sum(), math.log1p(30) - math.log1p(0.25))
    mixed = Curve("mixed", share=0.25, window=3).at(8.0)
    assert (mixed.w_cfg, mixed.w_igg, mixed.window) == (6.0, 2.0, 3) and total(mixed) == 8.0
    curves = curves_of(["cfg", "igg", "mixed"], [None, 3], [0.25, 0.5], [(0, None), (2, None)])
    assert len(curves) == 2 * (1 + 2 + 2 * 2)  # per interval: cfg, igg per window, mixed per share and window
    assert Curve("igg", window=3).holds(Candidate(None, 5.0, 3)) and not Curve("igg").holds(Candidate(None, 5.0, 3))


def test_descend_finds_every_local_minimum():
    assert descend([5.0, 3.0, 4.0, 9.0, 2.0, 2.5]) == [1, 1, 1, 4, 4, 4]
    assert descend([1.0, 2.0, 3.0]) == [0, 0, 0] and descend([4.0]) == [0]


def test_rho_interval_is_fisher_z_around_spearman():
    assert Rho.of([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0.95) is None  # too few points for an interval
    gaps, fids = [1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 4, 3, 6, 5, 8, 7]
    rho = Rho.of(gaps, fids, 0.95)
    half = 1.959964 * math.sqrt(1.06 / 5)
    assert math.isclose(rho.value, 0.9047619, rel_tol=1e-6) and rho.n == 8
    assert math.isclose(rho.low, math.tanh(math.atanh(rho.value) - half), rel_tol=1e-5)
    assert math.isclose(rho.high, math.tanh(math.atanh(rho.value) + half), rel_tol=1e-5)
    assert "right way" in rho.verdict() and "wrong way" in Rho.of(gaps, fids[::-1], 0.95).verdict()


def test_screen_finds_the_basin_behind_a_hump_and_extends_the_survivors(tmp_path, scorer):
    stage = screen_stage(tmp_path, scorer)
    pool = StubPool(evaluate=humped)
    result = stage.run(pool)
    first = [j for j in pool.seen if j.num_images == 32]
    second = [j for j in pool.seen if j.num_images == 64]
    assert len(first) == 9 and all(j.start == 0 for j in first)
    assert len(second) == math.ceil(0.5 * 9) and all(j.start == 32 for j in second)  # extended, never redrawn
    near = lambda p, u: abs(math.log1p(p.total) - u) <= result.spacing  # noqa: E731
    assert near(result.basins[0].point, U_B)  # the deepest basin, beyond the hump, is the best
    assert any(near(b.point, U_A) for b in result.basins[1:])  # and the shallow one is found too
    survivors = [p for p in result.points if 64 in p.scores]
    assert any(near(p, U_A) for p in survivors) and any(near(p, U_B) for p in survivors)
    assert result.refined[0] is result.basins[0] and all(b.kept for b in result.refined)
    assert result.rho is not None and result.rho.n == 9 and result.rho.low <= result.rho.value <= result.rho.high


def test_basins_rank_by_fid_so_a_narrow_basin_is_not_smoothed_away(tmp_path, scorer):
    narrow = totals(SCREEN.points, 0.25, 30.0)[6]  # one screen point deep, its neighbours on steep walls

    def spiked(job: Job) -> Evaluation:
        evaluation = humped(job)
        if job.fid:
            u, base = math.log1p(strength(job.candidate)), evaluation.features["features"]
            base[:, 0] += -base[:, 0].mean() + (0.3 if strength(job.candidate) == narrow
                                                else 0.6 + 2.5 * abs(u - U_A))
        return evaluation

    # every point reaches the last rung, so the narrow one is smoothed with its steep neighbours there too
    result = screen_stage(tmp_path, scorer, config=replace(SCREEN, keep=1.0)).run(StubPool(evaluate=spiked))
    best, wide = result.basins[0], next(b for b in result.basins if abs(math.log1p(b.point.total) - U_A) < 0.4)
    assert best.point.total == narrow and result.refined[0] is best
    assert best.point.scores[64].fid < wide.point.scores[64].fid
    assert best.smoothed > wide.smoothed  # smoothing alone would have ranked the narrow basin below the wide one
    fids = [b.point.scores[64].fid for b in result.basins]
    assert fids == sorted(fids)


def test_the_proxy_adds_points_but_removes_none(tmp_path, scorer):
    result = screen_stage(tmp_path, scorer, extra=[Candidate(4.5, None, None), Candidate(None, 3.0, None)]).run(
        StubPool(evaluate=humped))
    assert sorted(p.total for p in result.points) == sorted([*totals(9, 0.25, 30.0), 4.5])  # igg: not a curve here


def test_a_killed_screen_resumes_to_the_uninterrupted_result(tmp_path, scorer):
    whole = screen_stage(tmp_path, scorer, name="whole").run(StubPool(evaluate=humped))
    with pytest.raises(KeyboardInterrupt):
        screen_stage(tmp_path, scorer, name="killed").run(StubPool(evaluate=humped, crash_after=11))
    pool = StubPool(evaluate=humped)
    again = screen_stage(tmp_path, scorer, name="killed").run(pool)
    assert len(pool.seen) == 9 + 5 - 11
    assert [(p.total, p.scores) for p in again.points] == [(p.total, p.scores) for p in whole.points]
    assert [b.point.total for b in again.refined] == [b.point.total for b in whole.refined]


def test_a_region_starts_from_the_screened_points_without_drawing_them_again(tmp_path, scorer):
    result = screen_stage(tmp_path, scorer).run(StubPool(evaluate=humped))
    basin = result.refined[0]
    seeds = tuple(p.record for p in result.points if 64 in p.scores
                  and abs(math.log1p(p.total) - math.log1p(basin.point.total)) <= result.spacing + 1e-9)
    refine = RefineConfig(n_trials=4, num_images=64)
    start = Start("cfg", basin.point.candidate, result.spacing, seeds)
    stage = refine_stage(tmp_path, scorer, kinds=("cfg",), name="screen", refine=refine, starts={"cfg-0": start})
    pool = StubPool(evaluate=humped)
    refined = stage.run(pool)
    search = stage.regions["cfg-0"]
    told = search.counted()
    assert len(told) == len(seeds) + refine.n_trials and len(pool.seen) == refine.n_trials
    assert [record_of(t).stage for t in told[: len(seeds)]] == ["screen"] * len(seeds)
    assert all(record_of(t).images == 0 for t in told[: len(seeds)])  # their images count in the screen's cost
    assert {from_params(t.params) for t in told[: len(seeds)]} == {Candidate(**r.candidate) for r in seeds}
    assert abs(math.log1p(refined.finalists(1, 2, 0.0)[0].candidate.w_cfg) - U_B) <= result.spacing


def test_igg_against_cfg_takes_cfgs_best_not_the_published_default(tmp_path, scorer):
    b = bank(tmp_path)
    cfg_best, default, igg = Candidate(9.0, None, None), Candidate(1.5, None, None), Candidate(None, 18.0, None)
    for c in (cfg_best, default, igg):
        for start, n in ((0, 16), (16, 32)):
            job = Job(c, n, b.seed_of(c), fid=True, start=start)
            b.put(job, {"features": features(job)})
    def score(fid: float) -> FidScore:
        return FidScore(fid, fid - 0.5, fid + 0.5, 0.25)

    racers = [Racer(igg, REFINED, scores={32: score(1.0)}), Racer(default, DEFAULT, scores={32: score(9.0)})]
    point = ScreenPoint(Curve("cfg"), 9.0, scores={16: score(1.0)})
    screen = ScreenResult([point], [Basin(point, 1.0)], [], 16, 0.36, None)
    result = versus(racers, screen, b, scorer)  # CFG's best is its screened basin, not the default in the race
    assert (result.cfg, result.igg, result.num_images) == (cfg_best.label(), igg.label(), 16)
    assert result.low <= result.diff <= result.high and result.verdict.endswith("includes 0") == (result.low <= 0
                                                                                                  <= result.high)


@pytest.mark.parametrize("clip", [None, Interval(0.31, 0.30, 0.32)])
def test_a_score_round_trips_through_the_metrics_a_trial_logs(clip):
    score = FidScore(12.5, 11.0, 14.0, 0.75, clip, {"isc": 2.5, "kid": 0.01})
    metrics = score.metrics()
    assert metrics["fid"] == 12.5 and metrics["fid_se"] == 0.75 and metrics["kid"] == 0.01
    assert ("clip_score" in metrics) == (clip is not None)
    assert FidScore.of(metrics) == score


def test_an_interval_has_a_direction_only_when_it_excludes_zero():
    assert [direction(lo, hi) for lo, hi in ((0.1, 0.3), (-0.3, -0.1), (-0.1, 0.1), (0.0, 0.2), (-0.2, 0.0))] == [
        1, -1, 0, 0, 0]


def test_heads_first_puts_each_groups_best_before_any_second():
    ranked = [("a", 1), ("a", 2), ("b", 3), ("a", 4), ("c", 5), ("b", 6)]
    assert heads_first(ranked, lambda x: x[0]) == [("a", 1), ("b", 3), ("c", 5), ("a", 2), ("a", 4), ("b", 6)]
    assert heads_first([], lambda x: x) == []
    twins = [("a", 1), ("a", 1), ("b", 2)]  # equal items are kept, each once in its place
    assert heads_first(twins, lambda x: x[0]) == [("a", 1), ("b", 2), ("a", 1)]


@pytest.mark.parametrize("start", [0, 16, 20, 32, 63])
def test_the_bank_gives_images_from_any_start(tmp_path, start):
    c, b = Candidate(9.0, None, None), bank(tmp_path)
    for lo, hi in ((0, 16), (16, 32), (32, 64)):
        job = Job(c, hi, b.seed_of(c), fid=True, start=lo)
        b.put(job, {"features": features(job)})
    whole = features(Job(c, 64, b.seed_of(c), fid=True))
    assert np.array_equal(b.get(c, 64, ["features"], start)["features"].numpy(), whole[start:])
