"""The worker on a real (micro, random) VAR and the Ray actor pool on a real local Ray with 2 CPUs."""

from __future__ import annotations

import io
import ipaddress
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from processes import descendants, listening
from sweep_fixtures import PATCH_NUMS, micro_overrides, write_micro_backbone

from pipeline.config.schema import load_config
from pipeline.core.metrics import trial_mean
from pipeline.core.sampling import sample, spread_labels
from pipeline.core.seeds import derive_seed
from pipeline.fid.fidelity import FidEvaluator
from pipeline.preflight import fid_reference
from pipeline.runtime.distributed import (
    LOOPBACK,
    RayPool,
    Worker,
    WorkerStartError,
    _probe,
    actor_resources,
    check_capacity,
    connect,
)
from tuners.jobs import SIGNALS, Job
from tuners.space import Candidate

MIXED = Candidate(w_cfg=2.0, w_igg=1.0, window=3)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    paths = write_micro_backbone(d / "ckpt")
    return load_config([
        *micro_overrides(paths, d / "root"), "proxy.batch_size=4", "confirm.batch_size=16",
        "confirm.reference_num_images=40", "refine.num_images=32", "screen.rungs=[32]", "confirm.rungs=[48,64]",
        "sweep.grid_images=4", "sweep.grid_nrow=2", "sweep.heatmap_images=2",
        "launcher.workers=2", "launcher.max_retries=1"])


@pytest.fixture(scope="module")
def reference(cfg):
    return fid_reference(cfg)[1]


@pytest.fixture(scope="module")
def worker(cfg, reference):
    return Worker(cfg, reference)


def test_spread_labels_are_balanced_spread_and_prefix_consistent():
    assert spread_labels(8, 8).tolist() == [0, 5, 2, 7, 4, 1, 6, 3]  # step 5 = round(0.618 * 8)
    assert sorted(spread_labels(1000, 1000).tolist()) == list(range(1000))  # every class once per C images
    assert torch.equal(spread_labels(300, 1000), spread_labels(600, 1000)[:300])  # a larger N extends a smaller
    assert len(set(spread_labels(100, 1000).tolist())) == 100  # a short prefix still spreads over classes
    assert spread_labels(6, 4).tolist() == [0, 3, 2, 1, 0, 3]


def test_proxy_job_equals_the_sampler(cfg, worker):
    job = Job(MIXED, num_images=4, seed=5)
    ev = worker.evaluate(job)
    assert ev.error is None and ev.features == {} and ev.num_images == 4 and ev.wall_s > 0
    direct = sample(worker.backbone, spread_labels(4, worker.backbone.num_classes), w_cfg=2.0, w_igg=1.0, window=3,
                    seed=derive_seed(5, 0))
    for name in SIGNALS:
        per_scale = [getattr(s, name) for s in direct.signals]
        assert ev.per_scale[name] == pytest.approx([float(v.mean()) for v in per_scale], abs=1e-6)
        assert ev.signals[name] == pytest.approx(float(trial_mean(per_scale).mean()), abs=1e-6)
    grid = Image.open(io.BytesIO(ev.images["samples.png"]))
    side = 16 + 2  # image + padding
    assert grid.size == (2 * side + 2, 2 * side + 2)
    Image.open(io.BytesIO(ev.images["guidance.png"])).verify()


def test_batches_seeds_and_aggregation(worker):
    six = worker.evaluate(Job(MIXED, num_images=6, seed=0))  # batches of 4 + 2
    again = worker.evaluate(Job(MIXED, num_images=6, seed=0))
    other = worker.evaluate(Job(MIXED, num_images=6, seed=1))
    assert six.signals == again.signals and six.per_scale == again.per_scale
    assert six.signals != other.signals
    assert all(len(v) == len(PATCH_NUMS) for v in six.per_scale.values())
    for name in SIGNALS:
        assert six.signals[name] == pytest.approx(sum(six.per_scale[name][1:]) / (len(PATCH_NUMS) - 1), abs=1e-6)


def test_fid_job_returns_the_features_of_the_same_images(cfg, worker, reference):
    job = Job(Candidate(1.5, None, None), num_images=48, seed=3, fid=True)
    ev = worker.evaluate(job)
    assert ev.error is None and ev.num_images == 48
    labels = spread_labels(48, worker.backbone.num_classes)
    images = [sample(worker.backbone, labels_B, w_cfg=1.5, w_igg=None, seed=derive_seed(3, b)).images
              for b, labels_B in enumerate(labels.split(cfg.confirm.batch_size))]
    evaluator = FidEvaluator(cfg.backbone.fid_extractor, metrics=cfg.confirm.metrics,
                             weights_path=cfg.confirm.extractor_weights, progress=False)
    expected = evaluator.features(images)
    assert set(ev.features) == set(expected)
    for layer, array in ev.features.items():
        np.testing.assert_allclose(array, expected[layer].numpy(), rtol=1e-5, atol=1e-6)
    metrics = evaluator.metrics_of({k: torch.from_numpy(v) for k, v in ev.features.items()}, reference)
    assert metrics["fid"] > 0 and math.isfinite(metrics["kid"])
    # a job that starts at image 16 samples exactly images 16..47 of the same candidate
    tail = worker.evaluate(Job(job.candidate, num_images=48, seed=3, fid=True, start=16))
    assert tail.num_images == 32
    for layer, array in tail.features.items():
        np.testing.assert_allclose(array, ev.features[layer][16:], rtol=1e-5, atol=1e-6)
    bad = worker.evaluate(Job(job.candidate, num_images=48, seed=3, fid=True, start=5))
    assert "not at a batch boundary" in bad.error


def test_numerical_fault_fails_the_job_with_its_reason(worker):
    ev = worker.evaluate(Job(Candidate(1e38, None, None), num_images=4, seed=0))
    assert ev.error and ev.signals == {} and ev.wall_s > 0


def test_fid_job_without_reference_is_an_error(cfg, worker):
    bare = Worker.__new__(Worker)
    bare.__dict__.update(worker.__dict__, fid=None, reference=None)
    ev = bare.evaluate(Job(MIXED, 4, 0, fid=True))
    assert ev.error == "ValueError: this worker has no FID feature extractor; start it with a reference"


def test_unreachable_address_fails_fast():
    with pytest.raises(ConnectionError, match="no Ray cluster answered within 1 s"):
        _probe("127.0.0.1:1", 1.0)
    with pytest.raises(ConnectionError, match="not auto, host:port"):
        _probe("nowhere", 1.0)


@pytest.fixture(scope="module")
def local_ray(cfg):
    started = connect(cfg.launcher)
    assert started and ray.cluster_resources()["CPU"] == 2
    yield
    ray.shutdown()


def test_worker_without_its_checkpoint_fails_the_pool(cfg, reference, local_ray, tmp_path):
    """Before any job: one line naming the node and the file (the driver saw the file; this node does not)."""
    gone = tmp_path / "var.pt"
    one = replace(cfg, backbone=replace(cfg.backbone, var_ckpt=str(gone)), launcher=replace(cfg.launcher, workers=1))
    with pytest.raises(WorkerStartError) as err:
        RayPool(one, reference)
    [node] = [n["NodeID"] for n in ray.nodes()]
    message = str(err.value)
    assert f"Ray node {node}" in message and f"backbone.var_ckpt={gone}" in message and "\n" not in message


@pytest.fixture(scope="module")
def pool(local_ray, cfg, reference):
    pool = RayPool(cfg, reference)
    yield pool
    pool.close()


def settle(pool) -> None:
    """Wait until every replacement actor has joined the pool."""
    for ref in list(pool.joining):
        ray.wait([ref], timeout=60)
        pool._joined(ref)


def test_capacity_check(pool, cfg):
    check_capacity(cfg.launcher)  # 2 actors x 1 CPU on 2 CPUs
    with pytest.raises(ValueError, match=r"launcher.workers=3 needs 3 CPU but the Ray cluster has 2"):
        check_capacity(replace(cfg.launcher, workers=3))
    assert actor_resources(cfg.launcher) == {"num_cpus": 1}  # no GPU here


def test_pool_keeps_both_actors_busy_and_matches_the_local_worker(pool, worker):
    jobs = {0: Job(MIXED, 4, 0), 1: Job(Candidate(3.0, None, None), 4, 0)}
    assert pool.idle() == 2
    for tag, job in jobs.items():
        pool.submit(tag, job)
    assert pool.idle() == 0 and pool.pending() == 2
    done = {d.tag: d for d in (pool.wait(), pool.wait())}
    assert pool.idle() == 2 and pool.pending() == 0
    for tag, job in jobs.items():
        assert done[tag].error is None and done[tag].retries == 0
        assert done[tag].evaluation.signals == pytest.approx(worker.evaluate(job).signals)
        evaluation = done[tag].evaluation  # numbers and PNG bytes only
        assert all(isinstance(v, float) for v in evaluation.signals.values())
        assert all(isinstance(b, bytes) for b in evaluation.images.values())
        assert not any(isinstance(v, torch.Tensor) for v in vars(evaluation).values())


def busy(pool) -> ray.actor.ActorHandle:
    """The one actor with a job."""
    [(_, actor)] = pool.running.values()
    return actor


def test_local_ray_listens_on_loopback_only(pool):
    sockets = listening([os.getpid(), *descendants(os.getpid())])  # the driver, Ray's daemons, the actors
    head = ray.get_runtime_context().gcs_address
    assert head.startswith("127.0.0.1:") and (LOOPBACK, int(head.rsplit(":", 1)[1])) in {s[:2] for s in sockets}
    assert all(ipaddress.ip_address(address).is_loopback for address, _, _ in sockets), sockets
    nodes = {(n["NodeManagerAddress"], n["NodeID"]) for n in ray.nodes()}
    job = Job(MIXED, 4, 0)
    pool.submit(0, job)
    assert (LOOPBACK, pool.wait().evaluation.node_id) in nodes


def test_dead_actor_is_replaced_and_the_job_retried(pool, cfg):
    pool.submit(7, Job(MIXED, 8, 0))
    killed = busy(pool)
    ray.kill(killed)
    done = pool.wait()
    assert (done.tag, done.error, done.retries) == (7, None, 1)
    assert killed not in pool.actors and len(pool.actors) == 2 and pool.idle() == 2
    cfg.launcher.max_retries = 0  # the driver reads the bound at each failure
    pool.submit(8, Job(MIXED, 4, 0))
    ray.kill(busy(pool))
    done = pool.wait()
    assert done.evaluation is None and done.error.startswith("worker died 1 times") and done.retries == 0
    assert pool.idle() == 2 and len(pool.actors) == 2
    cfg.launcher.max_retries = 1


def test_pool_shrinks_to_what_the_cluster_holds_and_grows_back(pool):
    """A replacement Ray cannot place (another actor took the dead one's CPU) leaves one actor for two jobs in
    flight: the second waits in the driver; once the CPU is free again the replacement joins."""

    class Squatter:  # defined here, so that Ray ships the class by value (the workers cannot import tests/)
        def ping(self) -> bool:
            return True

    settle(pool)  # the previous test's replacements
    pool.submit(0, Job(MIXED, 8, 0))
    ray.kill(busy(pool))
    squatter = ray.remote(num_cpus=1)(Squatter).remote()
    assert ray.get(squatter.ping.remote(), timeout=60)
    pool.submit(1, Job(MIXED, 4, 1))
    assert pool.idle() == 0 and pool.pending() == 2
    first = pool.wait()
    assert (first.tag, first.error, first.retries) == (1, None, 0)
    assert len(pool.running) == 1 and not pool.queue and not pool.free  # job 0 runs again on the actor left
    second = pool.wait()
    assert (second.tag, second.error, second.retries) == (0, None, 1)
    assert len(pool.joining) == 1 and not ray.wait(list(pool.joining), timeout=1)[0]  # not placed
    ray.kill(squatter)
    settle(pool)
    assert len(pool.free) == 2 and pool.idle() == 2

