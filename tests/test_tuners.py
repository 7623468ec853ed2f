"""Tuner logic on a synthetic objective: calibration, proxy search, confirm, resume, stale RUNNING trials.

The workers are an in-process stub (no backbone): the signals are closed-form functions of the guidance weights whose
scaled evenness and divergence cross at a known weight. Optuna storage is a real SQLite file in tmp_path.
"""

from __future__ import annotations

import json
import math
from collections import deque

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.config import BackboneConfig, ConfirmConfig, GuidanceConfig, ProxyConfig, SearchConfig
from tuners.confirm import DEFAULT, PROXY, UNGUIDED, Confirmed, baselines, best_of, run_confirm, select_candidates
from tuners.confirm import spearman as spearman_rho
from tuners.jobs import Done, Evaluation, Job
from tuners.proxy import Calibration, calibrate, gap_name, job_key, run_proxy
from tuners.samplers import derive_seed, make_sampler
from tuners.space import Candidate, design_points, suggest
from tuners.studies import fail_stale, open_study, study_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

W_STAR = 2.0  # the synthetic FID optimum
W_HIGH = 6.0


def strength(c: Candidate) -> float:
    return (c.w_cfg or 0.0) + 0.5 * (c.w_igg or 0.0)


def synthetic(job: Job) -> Evaluation:
    """Evenness falls and divergence rises with the guidance strength s; the calibrated crossing is at s = 3."""
    s = strength(job.candidate)
    signals = {
        "vocab_evenness": 0.6 - 0.05 * s,
        "token_evenness": 0.9 - 0.001 * s,
        "div_uncond": 0.05 + 0.05 * s,
        "div_cond": 0.02 + 0.01 * s,
    }
    fid = {"fid": 10.0 + (s - W_STAR) ** 2} if job.fid else {}
    return Evaluation(
        signals=signals,
        per_scale={k: [v, v] for k, v in signals.items()},
        fid_metrics=fid,
        num_images=job.num_images,
        wall_s=0.1,
    )


class StubPool:
    """`workers` in-process workers; jobs finish in submission order (or last-first with `lifo`).

    `crash_after`: the driver dies (KeyboardInterrupt) when waiting for the job after that many finished ones.
    """

    def __init__(self, workers: int = 2, lifo: bool = False, fail_if=None, crash_after: int | None = None):
        self.workers, self.lifo, self.fail_if, self.crash_after = workers, lifo, fail_if, crash_after
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
        return Done(tag, synthetic(job), None, retries=0)


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


GUIDANCE = GuidanceConfig(name="cfg", params=["w_cfg"])
MIXED = GuidanceConfig(name="mixed", params=["w_cfg", "w_igg", "window"])
PROXY_CFG = ProxyConfig(num_images=4, calibration=[0.0, 0.5, 1.0])


def search_cfg(n_trials: int, sampler: str = "tpe") -> SearchConfig:
    return SearchConfig(n_trials=n_trials, sampler=sampler, n_startup_trials=4, w_cfg=[0.0, W_HIGH])


def studies(tmp_path, name: str = "s"):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    return tuple(open_study(storage, study_name(name, stage)) for stage in ("calibration", "proxy", "confirm"))


def calibrated(cal_study, proxy_study, pool, guidance=GUIDANCE, search=None):
    points = design_points(guidance, search or search_cfg(8), PROXY_CFG.calibration)
    return calibrate(cal_study, proxy_study, pool, points, PROXY_CFG, 0, Recorder())


def test_design_points_walk_the_diagonal():
    search = SearchConfig(w_cfg=[1.0, 5.0], w_igg=[0.0, 2.0], windows=[3])
    points = design_points(MIXED, search, [1.0, 0.0, 0.5, 0.5])
    assert points == [Candidate(1.0, 0.0, None), Candidate(3.0, 1.0, None), Candidate(5.0, 2.0, None)]
    assert design_points(GUIDANCE, search, [0.0, 1.0]) == [Candidate(1.0, None, None), Candidate(5.0, None, None)]


def test_suggest_only_searched_parameters(tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    search = SearchConfig(w_cfg=[1.0, 2.0], w_igg=[3.0, 4.0], windows=[None, 5])
    for guidance in (GUIDANCE, GuidanceConfig(name="igg", params=["w_igg", "window"]), MIXED):
        trial = study.ask()
        c = suggest(trial, guidance, search)
        assert set(trial.params) == set(guidance.params)
        assert (c.w_cfg is None) == ("w_cfg" not in guidance.params)
        assert c.w_cfg is None or 1.0 <= c.w_cfg <= 2.0
        assert c.w_igg is None or 3.0 <= c.w_igg <= 4.0
        assert c.window in (None, 5)


def test_candidate_key_rounds_weights_and_ignores_window_without_igg():
    assert Candidate(1.234, None, None).key(2) == Candidate(1.2349, None, None).key(2)
    assert Candidate(1.234, 2.0, 3).key(2) != Candidate(1.234, 2.0, 5).key(2)
    assert Candidate(1.0, None, 3).key(1) == Candidate(1.0, None, None).key(1)


def test_calibration_ranges_and_gap(tmp_path):
    cal, prox, _ = studies(tmp_path)
    calibration = calibrated(cal, prox, StubPool())
    assert calibration.ranges["vocab_evenness"] == pytest.approx((0.3, 0.6))
    assert calibration.ranges["div_uncond"] == pytest.approx((0.05, 0.35))
    assert prox.user_attrs["ranges"]["div_uncond"] == pytest.approx([0.05, 0.35])
    # scaled E = 1 - s/6, scaled D = s/6: the gap is |1 - s/3|, zero at s = 3
    gaps = calibration.gaps(synthetic(Job(Candidate(1.5, None, None), 4, 0)).signals)
    assert gaps[gap_name("vocab", "uncond")] == pytest.approx(0.5)
    assert set(gaps) == {gap_name(e, r) for e in ("vocab", "tokens") for r in ("uncond", "cond")}


def test_degenerate_range_gives_nan_for_that_pair_only():
    calibration = Calibration(
        ranges={"vocab_evenness": (0.0, 1.0), "token_evenness": (0.5, 0.5), "div_uncond": (0.0, 1.0),
                "div_cond": (0.0, 1.0)},
        points={},
    )
    gaps = calibration.gaps({"vocab_evenness": 0.2, "token_evenness": 0.5, "div_uncond": 0.5, "div_cond": 0.1})
    assert gaps[gap_name("vocab", "uncond")] == pytest.approx(0.3)
    assert math.isnan(gaps[gap_name("tokens", "uncond")])


def test_calibration_refuses_a_constant_signal(tmp_path):
    cal, prox, _ = studies(tmp_path)
    points = [Candidate(1.0, None, None), Candidate(1.0, None, None)]
    with pytest.raises(RuntimeError, match="did not vary"):
        calibrate(cal, prox, StubPool(), points, PROXY_CFG, 0, Recorder())


@pytest.mark.parametrize("sampler,n", [("tpe", 16), ("gp", 10), ("random", 10)])
def test_proxy_stage_converges_to_the_crossing(tmp_path, sampler, n):
    cal, prox, _ = studies(tmp_path)
    pool = StubPool(workers=2)
    calibration = calibrated(cal, prox, pool)
    trials = run_proxy(prox, pool, GUIDANCE, search_cfg(n, sampler), PROXY_CFG, calibration, 0, Recorder())
    assert len(trials) == n
    assert pool.max_pending == 2  # both workers kept busy
    best = min(trials, key=lambda t: t.value)
    assert best.params["w_cfg"] == pytest.approx(3.0, abs=0.6)
    assert best.value == pytest.approx(abs(1 - best.params["w_cfg"] / 3), abs=1e-6)
    assert set(best.user_attrs["result"]["gaps"]) >= {"gap_vocab_uncond", "gap_tokens_cond"}
    if sampler != "random":  # the model-based phase itself finds the crossing, past the random start-up
        modelled = [t for t in trials if t.number >= 6]
        assert min(modelled, key=lambda t: t.value).params["w_cfg"] == pytest.approx(3.0, abs=0.25)


def test_resume_does_not_redo_finished_trials(tmp_path):
    cal, prox, _ = studies(tmp_path)
    calibration = calibrated(cal, prox, StubPool())
    first = StubPool()
    run_proxy(prox, first, GUIDANCE, search_cfg(6), PROXY_CFG, calibration, 0, Recorder())
    assert len(first.seen) == 6
    cal2, prox2, _ = studies(tmp_path)  # a new driver, same sweep name
    again = StubPool()
    calibration2 = calibrated(cal2, prox2, again)
    assert again.seen == []  # calibration resumed from its ledger
    assert calibration2.ranges == calibration.ranges
    trials = run_proxy(prox2, again, GUIDANCE, search_cfg(9), PROXY_CFG, calibration2, 0, Recorder())
    assert len(again.seen) == 3
    assert len(trials) == 9
    assert len({t.number for t in trials}) == 9


def test_stale_running_trials_fail_and_are_reasked(tmp_path):
    cal, prox, _ = studies(tmp_path)
    calibration = calibrated(cal, prox, StubPool())
    run_proxy(prox, StubPool(), GUIDANCE, search_cfg(3), PROXY_CFG, calibration, 0, Recorder())
    dead = prox.ask()  # a driver asked, then died before telling
    lost = suggest(dead, GUIDANCE, search_cfg(5)).w_cfg
    _, prox2, _ = studies(tmp_path)
    pool = StubPool()
    run_proxy(prox2, pool, GUIDANCE, search_cfg(5), PROXY_CFG, calibration, 0, Recorder())
    stale = prox2.trials[dead.number]
    assert stale.state == TrialState.FAIL and stale.user_attrs["stale"] is True
    assert pool.seen[0].candidate.w_cfg == lost  # re-asked first
    assert len(pool.seen) == 2
    assert len(prox2.get_trials(states=(TrialState.COMPLETE,))) == 5
    assert fail_stale(prox2) == []


def test_worker_errors_fail_the_trial_with_reason_and_use_budget(tmp_path):
    cal, prox, _ = studies(tmp_path)
    calibration = calibrated(cal, prox, StubPool())
    pool = StubPool(fail_if=lambda job: job.candidate.w_cfg is not None and job.candidate.w_cfg > 4.0)
    recorder = Recorder()
    run_proxy(prox, pool, GUIDANCE, search_cfg(10, "random"), PROXY_CFG, calibration, 0, recorder)
    failed = prox.get_trials(states=(TrialState.FAIL,))
    assert failed and all(t.user_attrs["failure"] == {"reason": "worker raised: boom", "retries": 1} for t in failed)
    assert len(pool.seen) == 10
    assert sum(e[0] == "failed" for e in recorder.events) == len(failed)


def test_select_candidates_distinct_top_k(tmp_path):
    study = optuna.create_study()
    for w, gap in [(1.001, 0.1), (1.002, 0.2), (2.0, 0.3), (3.0, 0.05), (4.0, 0.9)]:
        study.add_trial(optuna.trial.create_trial(
            params={"w_cfg": w}, distributions={"w_cfg": optuna.distributions.FloatDistribution(0, 6)}, value=gap))
    picked = select_candidates(study.trials, top_k=3, decimals=2)
    assert [c.w_cfg for c, _ in picked] == [3.0, 1.001, 2.0]
    assert [g for _, g in picked] == [0.05, 0.1, 0.3]


def test_confirm_multi_fidelity_and_resume(tmp_path):
    cal, prox, conf = studies(tmp_path)
    pool = StubPool()
    backbone = BackboneConfig(name="stub", default_cfg=1.5)
    calibration = calibrated(cal, prox, pool)
    trials = run_proxy(prox, pool, GUIDANCE, search_cfg(12), PROXY_CFG, calibration, 0, Recorder())
    picked = select_candidates(trials, top_k=3, decimals=2)
    entries = [Confirmed(c, PROXY, g) for c, g in picked] + [Confirmed(c, role, 0.5) for c, role in baselines(backbone)]
    confirm = ConfirmConfig(top_k=3, small_num_images=8, num_images=32, full_top=2)
    before = len(pool.seen)
    run_confirm(conf, pool, entries, confirm, 0, Recorder())
    jobs = pool.seen[before:]
    small = [j for j in jobs if j.num_images == 8]
    full = [j for j in jobs if j.num_images == 32]
    assert all(j.fid for j in jobs)
    assert len(small) == 5 and len({job_key(j) for j in small}) == 5  # 3 distinct proxy + default + unguided
    assert len(full) == 3  # full_top guided + unguided
    assert {j.candidate for j in full} >= {Candidate(0.0, None, None)}
    guided = sorted((e for e in entries if e.role != UNGUIDED), key=lambda e: e.small["fid"])
    assert [e.full is not None for e in guided] == [True, True] + [False] * (len(guided) - 2)
    best = best_of(entries)
    assert best.full["fid"] == min(e.full["fid"] for e in entries if e.full)
    assert best.fid == pytest.approx(10.0 + (strength(best.candidate) - W_STAR) ** 2)
    # resume: a second confirm run redoes nothing and gives the same numbers
    again = StubPool()
    entries2 = [Confirmed(e.candidate, e.role, e.gap) for e in entries]
    run_confirm(open_study(f"sqlite:///{tmp_path}/optuna.db", study_name("s", "confirm")), again, entries2,
                confirm, 0, Recorder())
    assert again.seen == []
    assert [e.small for e in entries2] == [e.small for e in entries]
    assert [e.full for e in entries2] == [e.full for e in entries]
    assert {e.role for e in entries} == {PROXY, DEFAULT, UNGUIDED}


def test_confirm_stale_job_is_redone(tmp_path):
    _, _, conf = studies(tmp_path)
    entry = Confirmed(Candidate(2.0, None, None), PROXY, 0.1)
    confirm = ConfirmConfig(top_k=1, small_num_images=8, num_images=8, full_top=1)
    dead = conf.ask()
    dead.set_user_attr("job", {"key": job_key(Job(entry.candidate, 8, 0, fid=True))})
    pool = StubPool()
    run_confirm(conf, pool, [entry], confirm, 0, Recorder())
    assert conf.trials[0].state == TrialState.FAIL and conf.trials[0].user_attrs["stale"]
    assert len(pool.seen) == 1 and entry.small == entry.full == {"fid": 10.0}
    assert json.loads(conf.trials[1].user_attrs["job"]["key"])[:3] == [2.0, None, None]


def test_spearman():
    assert spearman_rho([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 4.0, 8.0]) == pytest.approx(1.0)
    assert spearman_rho([0.1, 0.2, 0.3], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(spearman_rho([0.1, 0.2], [1.0, 2.0]))
    assert math.isnan(spearman_rho([0.1, 0.2, float("nan")], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman_rho([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler='cma' is unknown"):
        make_sampler("cma", 0, 4)


def proxy_history(study) -> list[tuple[float, float]]:
    """(w_cfg, gap) of the budget-using trials in ask order (stale re-asked duplicates excluded)."""
    kept = [t for t in sorted(study.trials, key=lambda t: t.number) if not t.user_attrs.get("stale")]
    return [(t.params["w_cfg"], t.value) for t in kept]


def test_completion_order_does_not_change_the_search(tmp_path):
    histories = []
    for name, pool in (("fifo", StubPool(workers=3)), ("lifo", StubPool(workers=3, lifo=True))):
        cal, prox, _ = studies(tmp_path, name)
        calibration = calibrated(cal, prox, StubPool())
        run_proxy(prox, pool, GUIDANCE, search_cfg(9), PROXY_CFG, calibration, 0, Recorder())
        assert pool.max_pending == 3
        histories.append(proxy_history(prox))
    assert len(histories[0]) == 9 and histories[0] == histories[1]


@pytest.mark.parametrize("crash_after", [1, 5])
def test_killed_driver_resumes_to_the_uninterrupted_result(tmp_path, crash_after):
    cal, prox, _ = studies(tmp_path, "whole")
    calibration = calibrated(cal, prox, StubPool())
    run_proxy(prox, StubPool(lifo=True), GUIDANCE, search_cfg(8), PROXY_CFG, calibration, 0, Recorder())
    cal, prox, _ = studies(tmp_path, "killed")
    calibration = calibrated(cal, prox, StubPool())
    dying = StubPool(lifo=True, crash_after=crash_after)
    with pytest.raises(KeyboardInterrupt):
        run_proxy(prox, dying, GUIDANCE, search_cfg(8), PROXY_CFG, calibration, 0, Recorder())
    told_before = [t.number for t in prox.trials if t.state == TrialState.COMPLETE]
    _, prox2, _ = studies(tmp_path, "killed")  # the same command again
    again = StubPool(lifo=True)
    run_proxy(prox2, again, GUIDANCE, search_cfg(8), PROXY_CFG, calibration, 0, Recorder())
    assert all(prox2.trials[n].state == TrialState.COMPLETE for n in told_before)  # kept
    assert len(again.seen) == 8 - len(told_before)  # nothing told is run twice
    stale = [t for t in prox2.trials if t.user_attrs.get("stale")]
    assert stale and all(t.state == TrialState.FAIL for t in stale)
    whole = optuna.load_study(study_name=study_name("whole", "proxy"), storage=f"sqlite:///{tmp_path}/optuna.db")
    assert proxy_history(prox2) == proxy_history(whole)


def test_trial_left_waiting_is_replayed(tmp_path):
    cal, prox, _ = studies(tmp_path)
    calibration = calibrated(cal, prox, StubPool())
    prox.enqueue_trial({"w_cfg": 1.25})  # a driver enqueued a re-ask, then died before asking it
    pool = StubPool()
    run_proxy(prox, pool, GUIDANCE, search_cfg(3), PROXY_CFG, calibration, 0, Recorder())
    assert prox.trials[0].state == TrialState.FAIL and prox.trials[0].user_attrs["stale"]
    assert pool.seen[0].candidate.w_cfg == 1.25 and len(pool.seen) == 3


def test_derive_seed_is_deterministic_and_distinct():
    seeds = {derive_seed(s, i) for s in range(3) for i in range(3)}
    assert len(seeds) == 9 and derive_seed(1, 2) == derive_seed(1, 2)
