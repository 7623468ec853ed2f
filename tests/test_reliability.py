"""Reliability of the real sweep (`python -m pipeline.sweep` as real processes, real local Ray, real SQLite stores).

One module fixture runs two sweeps of the micro backbone at the same time against the same stores:
``plain`` runs to the end while one of its Ray actors is SIGKILLed mid-stage; ``killed`` has its driver SIGKILLed in
the proxy stage, is rerun with the same command, SIGKILLed again in the confirm stage, and rerun to the end. Both
proxy studies start with an absurd weight enqueued (non-finite logits). The tests read what the runs left behind:
the resumed sweep equals the uninterrupted one, nothing told is lost or redone, faults are recorded. The rest are
cheap checks: bad input refused before any store is touched, and atomic files under a crash before the rename.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from processes import cmdline, descendants, reap, trial_states
from sweep_fixtures import (
    SMALL_DESIGN,
    SMALL_STUDIES,
    SMALL_SWEEP,
    SMALL_TRIALS,
    micro_overrides,
    ran,
    study_trials,
    write_micro_backbone,
)

from pipeline.backbones.var import VARConfig, random_var
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.outputs.best import Best, Checkpoint, Cost, Sampling, read_best, write_best
from pipeline.runtime.tracking import PARENT_TAG, ROLE_TAG, STAGE_TAG, TRIAL_TAG
from pipeline.sweep import main
from tuners.studies import RECORD, record_of, study_name

REPO = Path(__file__).resolve().parent.parent
N_TRIALS = SMALL_TRIALS  # proxy trials after the design points; the absurd weight, asked first, fails
DESIGN = SMALL_DESIGN
STAGES = SMALL_STUDIES
KILLS = ("proxy", "screen", "confirm")  # the stages the driver is killed in, in their order
ABSURD = 1e38  # w_cfg that overflows the guided logits to inf (the sampler's probabilities become NaN)
SETTINGS = [*SMALL_SWEEP, "launcher.workers=2"]
RUN_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------ processes


class Sweep:
    """One `python -m pipeline.sweep` process."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", *args], cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the driver only, as a crash would, then clear what its Ray leaves behind."""
        left = descendants(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        reap(left)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=RUN_TIMEOUT_S)
        reap(descendants(self.proc.pid))
        return rc


def snapshot(storage: str, name: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    return study_trials(storage, name, STAGES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    root = d / "root"
    args = [*micro_overrides(write_micro_backbone(d / "ckpt"), root), *SETTINGS]
    storage, db = f"sqlite:///{root}/optuna.db", root / "optuna.db"
    root.mkdir()
    for name in ("plain", "killed"):  # the absurd weight is asked first (a queued trial is replayed first)
        optuna.create_study(storage=storage, study_name=study_name(name, "proxy")).enqueue_trial({"w_cfg": ABSURD})
    plain = Sweep([*args, "sweep.name=plain"], d / "plain.log")
    killed = Sweep([*args, "sweep.name=killed"], d / "killed.log")
    actor_killed, snapshots, deadline = None, {}, time.monotonic() + RUN_TIMEOUT_S
    stage = "proxy"  # where the next driver kill lands
    while (plain.running() or killed.running()) and time.monotonic() < deadline:
        if actor_killed is None and plain.running() and trial_states(db, "plain/proxy").get("COMPLETE", 0) >= 1:
            actors = [p for p in descendants(plain.proc.pid) if cmdline(p).startswith("ray::Worker")]
            busy = [p for p in actors if "evaluate" in cmdline(p)]
            if busy or actors:
                actor_killed = (busy or actors)[0]
                os.kill(actor_killed, signal.SIGKILL)
        if killed.running() and stage in KILLS:
            states = trial_states(db, f"killed/{stage}")
            if states.get("COMPLETE", 0) >= 2 and states.get("RUNNING", 0) >= 1:
                killed.kill()
                snapshots[stage] = snapshot(storage, "killed")
                killed = Sweep([*args, "sweep.name=killed"], d / "killed.log")  # the same command again
                stage = KILLS[KILLS.index(stage) + 1] if stage != KILLS[-1] else "done"
        time.sleep(0.05)
    rcs = {"plain": plain.finish(), "killed": killed.finish()}
    return {"root": root, "storage": storage, "rcs": rcs, "actor_killed": actor_killed, "snapshots": snapshots,
            "logs": {n: (d / f"{n}.log").read_text() for n in ("plain", "killed")}}


def final(runs, name: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    return snapshot(runs["storage"], name)


def children(runs, name: str) -> list:
    client = MlflowClient(f"sqlite:///{runs['root']}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    found = client.search_runs([exp.experiment_id], max_results=5000)
    [parent] = [r for r in found if r.data.tags.get(ROLE_TAG) == "parent"]
    assert parent.info.status == "FINISHED"
    return [r for r in found if r.data.tags.get(PARENT_TAG) == parent.info.run_id]


def complete(trials) -> list[optuna.trial.FrozenTrial]:
    return sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)


def test_both_sweeps_finish_and_print_best(runs):
    assert runs["rcs"] == {"plain": 0, "killed": 0}, runs["logs"]
    assert set(runs["snapshots"]) == set(KILLS)  # the driver was killed in every stage named
    for name in ("plain", "killed"):
        assert runs["logs"][name].rstrip().splitlines()[-1] == f"best: {runs['root'] / 'sweeps' / name / 'best.yaml'}"


def test_resumed_sweep_equals_the_uninterrupted_one(runs):
    plain, killed = final(runs, "plain"), final(runs, "killed")
    assert [(t.params, t.value) for t in complete(killed["proxy"])] == [
        (t.params, t.value) for t in complete(plain["proxy"])]
    assert len(complete(plain["proxy"])) == N_TRIALS + DESIGN - 1  # the absurd trial used budget
    assert [(t.params, t.value) for t in complete(killed["refine/cfg-0"])] == [
        (t.params, t.value) for t in complete(plain["refine/cfg-0"])]

    def fids(trials):
        return {t.user_attrs["job"]: record_of(t).metrics for t in complete(trials)}

    assert fids(killed["confirm"]) == fids(plain["confirm"]) and len(fids(plain["confirm"])) >= 3
    best = {n: yaml.safe_load((runs["root"] / "sweeps" / n / "best.yaml").read_text()) for n in ("plain", "killed")}
    costs = {n: {stage: (c["trials"], c["images"]) for stage, c in b.pop("cost").items()} for n, b in best.items()}
    assert best["killed"] == best["plain"] and math.isfinite(best["plain"]["fid"])  # all but the seconds
    assert costs["killed"] == costs["plain"]  # the work that counts: interrupted trials are not in it


@pytest.mark.parametrize("stage", KILLS)
def test_driver_kill_keeps_told_trials_and_reasks_the_interrupted(runs, stage):
    before = {t.number: t for t in runs["snapshots"][stage][stage]}
    after = {t.number: t for t in final(runs, "killed")[stage]}
    told = [n for n, t in before.items() if t.state == TrialState.COMPLETE]
    interrupted = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert len(told) >= 2 and interrupted
    for n in told:  # kept as they were
        assert after[n].state == TrialState.COMPLETE and after[n].value == before[n].value
    for n in interrupted:  # failed as interrupted (no record), and asked again under a new number
        assert after[n].state == TrialState.FAIL and RECORD not in after[n].user_attrs
        again = [t for t in after.values() if t.number > n and t.state == TrialState.COMPLETE]
        if stage == "proxy" and before[n].params:  # a kill between ask and the first suggest leaves no params,
            # one between two suggests the first ones: the trial asked again keeps them and samples the rest
            assert any(before[n].params.items() <= t.params.items() for t in again)
        elif "job" in before[n].user_attrs:
            assert before[n].user_attrs["job"] in [t.user_attrs["job"] for t in again]


def test_mlflow_runs_match_optuna_after_kills(runs):
    """A child run is FINISHED exactly when its trial is COMPLETE, FAILED when it failed for a reason of its own,
    and KILLED when a dead driver left it unfinished: nothing told is lost, nothing is run twice."""
    trials = final(runs, "killed")
    by_status: dict[str, set[tuple[str, int]]] = {}
    for run in children(runs, "killed"):
        key = (run.data.tags[STAGE_TAG], int(run.data.tags[TRIAL_TAG]))
        assert all(key not in seen for seen in by_status.values())  # one run per trial
        by_status.setdefault(run.info.status, set()).add(key)
    assert set(by_status) == {"FINISHED", "FAILED", "KILLED"}
    assert by_status["FINISHED"] == {(s, t.number) for s in STAGES for t in trials[s]
                                     if t.state == TrialState.COMPLETE and ran(s, t)}
    assert by_status["FAILED"] == {(s, t.number) for s in STAGES for t in trials[s]
                                   if t.state == TrialState.FAIL and RECORD in t.user_attrs}
    stale = {(s, t.number) for s in STAGES for t in trials[s] if t.state == TrialState.FAIL and RECORD not in
             t.user_attrs}
    assert by_status["KILLED"] <= stale and len(by_status["KILLED"]) >= 2  # one per kill at least


def test_dead_actor_is_retried_and_visible_in_mlflow(runs):
    assert runs["actor_killed"] is not None
    retried = [r for r in children(runs, "plain") if int(r.data.tags.get("guidetune.retries", "0")) > 0]
    assert retried and all(r.info.status == "FINISHED" and r.data.metrics["retries"] >= 1 for r in retried)


@pytest.mark.parametrize("name", ["plain", "killed"])
def test_non_finite_trial_fails_with_reason_and_the_sweep_goes_on(runs, name):
    proxy = final(runs, name)["proxy"]
    [absurd] = [t for t in proxy if t.params.get("w_cfg") == ABSURD]
    assert absurd.state == TrialState.FAIL and RECORD in absurd.user_attrs
    reason = record_of(absurd).error
    assert any(word in reason.lower() for word in ("non-finite", "inf", "nan")), reason
    [run] = [r for r in children(runs, name) if r.data.tags[STAGE_TAG] == "proxy"
             and int(r.data.tags[TRIAL_TAG]) == absurd.number]
    assert run.info.status == "FAILED" and run.data.tags["guidetune.fail_reason"] == reason
    assert len(complete(proxy)) == N_TRIALS + DESIGN - 1


def test_concurrent_sweeps_share_intact_stores(runs):
    names = set(optuna.get_all_study_names(runs["storage"]))
    assert names == {study_name(n, s) for n in ("plain", "killed") for s in STAGES}
    for db in ("optuna.db", "mlflow.db"):
        with sqlite3.connect(runs["root"] / db) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = MlflowClient(f"sqlite:///{runs['root']}/mlflow.db")
    assert sorted(e.name for e in client.search_experiments() if e.name != "Default") == ["killed", "plain"]
    assert all(r.data.tags["guidetune.sweep"] == "plain" for r in children(runs, "plain"))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """The micro backbone and files a user may pass by mistake (or an attacker on purpose)."""
    d = tmp_path_factory.mktemp("bad")
    paths = write_micro_backbone(d / "ckpt")
    marker = d / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "evil.pt").write_bytes(pickle.dumps(Evil()))
    torch.save({"w": torch.zeros(2), "evil": Evil()}, d / "evil_zip.pt")
    np.savez(d / "evil_objects.npz", arr_0=np.array([Evil()], dtype=object))
    (d / "text.npz").write_text("not an npz\n")
    (d / "truncated.pt").write_bytes(paths["var"].read_bytes()[:1000])
    other = random_var(
        VQVAEConfig(vocab_size=48, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                    using_sa=False, using_mid_sa=False),
        VARConfig(vocab_size=48, z_channels=8, depth=1, embed_dim=32, num_heads=2, num_classes=4, patch_nums=(1, 2, 4)))
    other.save(d / "other_vae.pt", d / "other_var.pt")
    (d / "a_file").write_text("")
    return {**paths, "marker": marker, **{p.stem: p for p in d.iterdir() if p.is_file()}}


BAD_FILES = [
    ("backbone.vae_ckpt", "evil", "weights_only"),
    ("backbone.var_ckpt", "evil_zip", "weights_only"),
    ("confirm.extractor_weights", "evil", "weights_only"),
    ("confirm.reference", "evil_objects", "arr_0 must be uint8"),
    ("backbone.var_ckpt", "truncated", "var_ckpt"),
    ("backbone.var_ckpt", "other_var", "does not fit"),
    ("confirm.reference", "text", "text.npz cannot be read"),
]


@pytest.mark.parametrize("key,which,message", BAD_FILES, ids=[f"{k}={w}" for k, w, _ in BAD_FILES])
def test_bad_file_exits_2_with_one_line_and_touches_nothing(bad_files, tmp_path, capsys, key, which, message):
    root = tmp_path / "root"
    assert main([*micro_overrides(bad_files, root), f"{key}={bad_files[which]}"]) == 2
    err = capsys.readouterr().err  # progress lines may precede the error (the FID extractor loads first)
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.splitlines()[-1]], err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not root.exists() and not bad_files["marker"].exists()


@pytest.mark.parametrize("key", ["root", "tracking.uri", "storage", "sweep.output_dir"])
def test_unwritable_store_exits_2(bad_files, tmp_path, capsys, key):
    blocked = bad_files["a_file"] / "mlruns"  # below a regular file: nothing can be created there, even by root
    value = f"sqlite:///{blocked}/x.db" if key in ("tracking.uri", "storage") else str(blocked)
    root = tmp_path / "root"
    overrides = [*micro_overrides(bad_files, root), f"{key}={value}"] if key != "root" else []
    assert main(overrides or micro_overrides(bad_files, blocked)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err and "choose a writable folder" in err, err
    assert not root.exists()


def test_silent_ray_address_fails_after_a_bounded_wait(bad_files, tmp_path, capsys):
    """A port that accepts connections but never answers (not a Ray head): Ray alone would retry for minutes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        rc = main([*micro_overrides(bad_files, tmp_path / "root"), f"launcher.address={address}",
                   "launcher.connect_timeout_s=2"])
        waited = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"launcher.address={address}: no Ray cluster answered within 2 s" in err
    assert waited < 60 and not (tmp_path / "root").exists()


def test_port_that_is_not_ray_is_named(bad_files, tmp_path, capsys):
    def greet_like_ssh(server: socket.socket) -> None:
        conn, _ = server.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.recv(64)
        conn.close()

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        thread = threading.Thread(target=greet_like_ssh, args=(server,), daemon=True)
        thread.start()
        rc = main([*micro_overrides(bad_files, tmp_path / "root"), f"launcher.address={address}",
                   "launcher.connect_timeout_s=5"])
        thread.join(timeout=10)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"launcher.address={address} answered but is not a Ray cluster" in err


# ------------------------------------------------------------------------------------------------ atomic files

CRASH_BEFORE_RENAME = """
import os, sys
from pathlib import Path
from pipeline.fid import fidelity as fid
from pipeline.outputs import best
def crash(*args):  # the process dies after the temp file is written, before it replaces the target
    os.kill(os.getpid(), 9)
os.replace = crash
if sys.argv[1] == "best":
    sampling = best.Sampling("linear", 0, None, 0, 0.0, 1, 0, 64, 0.95, "200 resamples", [1, 2], "i % 8", "seeds")
    best.write_best(sys.argv[2], best.Best("tiny", "cfg", "cfg", 9.0, None, None, 99.0, 98.0, 100.0, 64,
                                           {"w_cfg": "inside"}, None, None, None, {}, sampling, {}))
else:
    weights, cache = sys.argv[2:]
    evaluator = fid.FidEvaluator("guidetune-tiny", weights_path=weights, batch_size=20, cache_dir=cache)
    evaluator.reference(fid.reference_source("shapes", num_images=40, seed=0, batch_size=20))
"""


def crash_before_rename(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH_BEFORE_RENAME, *args], cwd=REPO, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_crash_before_rename_keeps_the_old_best_yaml(tmp_path):
    path = tmp_path / "best.yaml"
    sampling = Sampling("linear", 0, None, 0, 0.0, 1, 0, 64, 0.95, "200 resamples", [1, 2], "i % 8", "seeds")
    old = Best("tiny", "cfg", "cfg", 2.0, None, None, 12.5, 11.0, 14.0, 64, {"w_cfg": "inside"}, None, None, None,
               {"total": Cost(3, 192, 1.5)}, sampling, {"var_ckpt": Checkpoint("var.pt", "0" * 64)})
    write_best(path, old)
    crash_before_rename("best", str(path))
    assert read_best(path) == old  # never half-written: the old file, whole
    [leftover] = [p for p in tmp_path.iterdir() if p != path]
    assert leftover.name.startswith(".best.yaml.") and leftover.name.endswith(".tmp")
    assert "w_cfg: 9.0" in leftover.read_text()  # the new content went only to the temp file


def test_crash_before_rename_leaves_no_reference_cache_a_later_run_trusts(bad_files, tmp_path):
    from pipeline.fid.fidelity import FidEvaluator, reference_source

    cache = tmp_path / "fid_cache"
    crash_before_rename("fid", str(bad_files["cls"]), str(cache))
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []  # only the temp file is there

    def reference():
        evaluator = FidEvaluator("guidetune-tiny", weights_path=bad_files["cls"], batch_size=20, cache_dir=cache)
        return evaluator.reference(reference_source("shapes", num_images=40, seed=0, batch_size=20))

    first = reference()
    assert not first.from_cache
    [cached] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])  # a torn file, as a crash mid-write leaves
    again = reference()
    assert not again.from_cache and np.array_equal(again.mu, first.mu) and np.array_equal(again.sigma, first.sigma)
    assert reference().from_cache  # the rewritten cache is whole again

