"""Ray side of a sweep: the worker that evaluates guidance candidates, and the actor pool the driver keeps busy.

Each actor loads the backbone (and the FID feature extractor) once, then evaluates jobs: it samples the images,
reduces the per-scale signals to numbers, scores FID in memory, and renders a sample grid and a guidance heat map
as PNG bytes. Actors never write to a store; the driver logs what they return. On a machine with GPUs each actor
takes one (``launcher.gpus_per_worker``); otherwise ``launcher.cpus_per_worker`` CPUs. A local Ray (no
``launcher.address``) listens on the loopback interface only.

The pool keeps ``launcher.workers`` jobs in flight. An actor that dies (its process or its whole node) is replaced,
and its job re-run on the first actor free, at most ``launcher.max_retries`` times; jobs beyond the live actors wait
in the driver. A replacement the cluster cannot place (its node is gone and no other has room) waits until a node
can take it, so the pool shrinks to what the cluster can hold and grows back when nodes return. With no node left
(the Ray head no longer answers, or no live node could ever hold a worker) `RayPool.wait` raises `ClusterLostError`.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from torch import Tensor

from pipeline.backbones.load import checkpoint_keys, load_backbone
from pipeline.config.schema import ConfigError, LauncherConfig, SweepConfig
from pipeline.core.metrics import trial_mean
from pipeline.core.render import heatmap_png, sample_grid_png
from pipeline.core.sampling import Sampling, seeded_batches, sweep_conditions
from pipeline.fid.fidelity import FidEvaluator, Reference
from pipeline.runtime.internals import ray_node_address, ray_single_node
from tuners.jobs import CLIP_LAYER, SIGNALS, Done, Evaluation, Job

LOOPBACK = "127.0.0.1"
POLL_S = 5.0  # while waiting for a job, check this often that the cluster still answers


class WorkerStartError(ConfigError):
    """A Ray actor could not start (e.g. its node lacks a checkpoint); the message names the node and the file."""


class ClusterLostError(ConnectionError):
    """No node of the Ray cluster is left to run a worker; rerunning the same command resumes the sweep."""


def _reason(err: BaseException) -> str:
    """One line: the exception type and the last line of its message (Ray puts the cause last)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def _start_failure(err: RayActorError) -> str:
    """One line on why an actor did not start: the exception its __init__ raised, else why Ray gave up on it."""
    return str(err).strip().splitlines()[-1] if err.actor_init_failed else _reason(err)


def worker_files(cfg: SweepConfig, reference: Reference | None) -> list[tuple[str, str]]:
    """(config key, path) of every file a worker reads on its own node: the checkpoints, and with a reference the
    FID extractor's weights when configured. The reference statistics travel from the driver."""
    files = [(f"backbone.{key}", getattr(cfg.backbone, key)) for key in checkpoint_keys(cfg.backbone)]
    if cfg.backbone.prompts is not None:
        files.append(("backbone.prompts", cfg.backbone.prompts))
    if reference is not None and cfg.confirm.extractor_weights is not None:
        files.append(("confirm.extractor_weights", cfg.confirm.extractor_weights))
    if reference is not None and cfg.confirm.clip_weights is not None:
        files.append(("confirm.clip_weights", cfg.confirm.clip_weights))
    return [(key, str(path)) for key, path in files]


class Worker:
    """Evaluates jobs on one backbone loaded once (a Ray actor in the sweep; a plain object in tests).

    Args:
        cfg: the sweep configuration (backbone, guidance schedule, batch sizes, FID settings).
        reference: FID reference statistics (None: the worker cannot run FID jobs).
    """

    def __init__(self, cfg: SweepConfig, reference: Reference | None = None):
        self.cfg = cfg
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.hostname = socket.gethostname()
        missing = [f"{key}={path}" for key, path in worker_files(cfg, reference) if not Path(path).exists()]
        if missing:
            raise FileNotFoundError(
                f"the worker on Ray node {self.node_id} (host {self.hostname}) finds no {', '.join(missing)}; "
                "every node needs the checkpoints at the same paths"
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.launcher.cpus_per_worker)
        self.backbone = load_backbone(cfg.backbone, device=self.device)
        self.reference = reference
        self.fid = None
        if reference is not None:
            self.fid = FidEvaluator(
                cfg.backbone.fid_extractor,
                metrics=cfg.confirm.metrics,
                weights_path=cfg.confirm.extractor_weights,
                device=self.device,
                batch_size=cfg.confirm.batch_size,
                progress=False,
                image_size=cfg.backbone.fid_image_size,
            )
        self.clip = None
        if reference is not None and cfg.confirm.clip_weights is not None:
            from pipeline.fid.clip_score import ClipScorer

            self.clip = ClipScorer(cfg.confirm.clip_weights, device=self.device)

    def ping(self) -> str:
        return str(self.device)

    def evaluate(self, job: Job) -> Evaluation:
        """Sample, measure and (for FID jobs) score one candidate. Failures come back as `Evaluation.error`.

        Proxy jobs measure the signals on every image; FID jobs only on their first batch (the heat map and a
        snapshot), so the bulk of their sampling skips the diagnostics, and return the FID features of their
        images (`Evaluation.features`); the driver scores them.
        """
        start = time.perf_counter()
        try:
            evaluation = self._evaluate(job)
        except (RuntimeError, ValueError, FloatingPointError) as err:  # numerical faults fail this trial only
            evaluation = Evaluation(error=_reason(err), num_images=job.num_images)
        evaluation.wall_s = time.perf_counter() - start
        evaluation.node_id, evaluation.hostname = self.node_id, self.hostname
        return evaluation

    def _evaluate(self, job: Job) -> Evaluation:
        cfg, c = self.cfg, job.candidate
        batch_size = cfg.confirm.batch_size if job.fid else cfg.proxy.batch_size
        if job.start % batch_size:
            raise ValueError(f"job starts at image {job.start}, not at a batch boundary of {batch_size}")
        first = job.start // batch_size
        K = len(self.backbone.patch_nums)
        per_scale: dict[str, list[list[Tensor]]] = {name: [[] for _ in range(K)] for name in SIGNALS}
        shown: dict[str, object] = {}
        sampling = Sampling.of(cfg).guiding(c.interval)
        clip = self.clip if job.fid else None
        prompts = sweep_conditions(self.backbone, job.num_images, sampling) if clip is not None else []
        clip_scores: list[Tensor] = []

        def batches() -> Iterator[Tensor]:
            for b, result in seeded_batches(self.backbone, c.w_cfg, c.w_igg, c.window, num_images=job.num_images,
                                            batch_size=batch_size, seed=job.seed, sampling=sampling,
                                            start=job.start, with_signals=lambda b: b == first or not job.fid):
                if clip is not None:
                    clip_scores.append(clip(result.images, prompts[b * batch_size:(b + 1) * batch_size]))
                for k, signals in enumerate(result.signals):
                    for name in SIGNALS:
                        per_scale[name][k].append(getattr(signals, name))
                if b == first:
                    shown["images"] = result.images[: cfg.sweep.grid_images]
                    shown["maps"] = [s.magnitude_Bhw[: cfg.sweep.heatmap_images] for s in result.signals]
                yield result.images

        features: dict[str, np.ndarray] = {}
        if job.fid:
            if self.fid is None:
                raise ValueError("this worker has no FID feature extractor; start it with a reference")
            features = {layer: f.numpy() for layer, f in self.fid.features(batches()).items()}
            if clip is not None:
                features[CLIP_LAYER] = torch.cat(clip_scores)[:, None].numpy()
        else:
            for _ in batches():
                pass
        per_scale_N = {name: [torch.cat(parts) for parts in scales] for name, scales in per_scale.items()}
        signals = {name: float(trial_mean(values).mean()) for name, values in per_scale_N.items()}
        bad = [k for k, v in signals.items() if not np.isfinite(v)]
        bad += [f"{layer} features" for layer, f in features.items() if not np.isfinite(f).all()]
        if bad:
            return Evaluation(error=f"non-finite {', '.join(bad)} at {c.label()}", num_images=job.num_images)
        images = shown["images"]
        assert isinstance(images, Tensor)
        return Evaluation(
            signals=signals,
            per_scale={name: [float(v.mean()) for v in values] for name, values in per_scale_N.items()},
            features=features,
            num_images=job.sampled,
            images={
                "samples.png": sample_grid_png(images, nrow=cfg.sweep.grid_nrow),
                "guidance.png": heatmap_png(shown["maps"], c.label()),  # type: ignore[arg-type]
            },
        )


# HTTP/2 client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray client server)
# answers with its own SETTINGS frame (frame type 4, the fourth byte of the 9-byte frame header).
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4


def _probe(address: str, timeout_s: float) -> None:
    """Raise ConnectionError unless host:port (or ray://host:port) answers as a gRPC server within timeout_s.

    Ray's own connect retries for minutes against a port that accepts connections but never answers; this check
    bounds the wait and tells a closed port (nothing listens) from a port that is not a Ray cluster.
    """
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise ConnectionError(f"launcher.address={address} is not auto, host:port or ray://host:port")
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            sock.sendall(_HTTP2_HELLO)
            header = sock.recv(9)
    except OSError as err:
        raise ConnectionError(
            f"launcher.address={address}: no Ray cluster answered within {timeout_s:g} s ({err}); start one with "
            "`ray start --head` or set launcher.address=null for a local Ray"
        ) from None
    if len(header) < 4 or header[3] != _SETTINGS_FRAME:
        raise ConnectionError(
            f"launcher.address={address} answered but is not a Ray cluster (no gRPC reply); give the head node's "
            "address (`ray status` on the head prints it) or set launcher.address=null for a local Ray"
        )


def connect(launcher: LauncherConfig) -> bool:
    """Join the cluster at launcher.address, or start a local Ray on loopback; True when this call started Ray.

    Raises:
        ConnectionError: the address did not answer within launcher.connect_timeout_s.
    """
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
    if launcher.address is None:
        # Ray swaps a loopback node address for the machine's routable one unless multi-node clusters are off (its
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import); off for this call, every process of the local Ray
        # listens on 127.0.0.1 only. Clusters are unaffected: their nodes are started by `ray start`. address="local"
        # starts a Ray of its own even when another one runs on this machine (never joins it).
        with ray_single_node():
            ray.init(
                address="local",
                num_cpus=launcher.num_cpus or launcher.workers * launcher.cpus_per_worker,
                object_store_memory=launcher.object_store_memory,
                **ray_node_address(LOOPBACK),
                **quiet,
            )
        return True
    if launcher.address != "auto":
        _probe(launcher.address, launcher.connect_timeout_s)
    try:
        ray.init(address=launcher.address, **quiet)
    except ConnectionError as err:
        if "AuthenticationError" in str(err.__cause__):  # Ray names the refused token only in the cause's text
            fix = ("the cluster wants its token: set RAY_AUTH_MODE=token and give the head's token "
                   "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
        else:
            fix = "start a cluster with `ray start --head` or set launcher.address=null for a local Ray"
        raise ConnectionError(f"launcher.address={launcher.address}: {err}; {fix}") from None
    return False


RESOURCE_OF = {"num_cpus": "CPU", "num_gpus": "GPU"}  # actor option -> Ray resource name


def actor_resources(launcher: LauncherConfig) -> dict[str, int]:
    """Ray resources of one actor: its CPUs, and one GPU (gpus_per_worker) when the cluster has GPUs."""
    options = {"num_cpus": launcher.cpus_per_worker}
    if ray.cluster_resources().get("GPU", 0):
        options["num_gpus"] = launcher.gpus_per_worker
    return options


def check_capacity(launcher: LauncherConfig) -> None:
    """Raise ConfigError if the connected cluster cannot place every actor (Ray would wait for them forever)."""
    have = ray.cluster_resources()
    for option, per_worker in actor_resources(launcher).items():
        kind = RESOURCE_OF[option]
        need, available = launcher.workers * per_worker, have.get(kind, 0)
        if need > available:
            raise ConfigError(
                f"launcher.workers={launcher.workers} needs {need:g} {kind} but the Ray cluster has {available:g}; "
                f"lower launcher.workers or launcher.{kind.lower()}s_per_worker"
            )


def _can_hold_a_worker(launcher: LauncherConfig) -> bool:
    """Whether some live node of the cluster has, in total, the resources of one actor."""
    need = {RESOURCE_OF[option]: n for option, n in actor_resources(launcher).items()}
    return any(all(node["Resources"].get(kind, 0) >= n for kind, n in need.items())
               for node in ray.nodes() if node["Alive"])


@dataclass
class _Running:
    tag: int
    job: Job
    retries: int = 0  # times the job was re-run after its actor died


@dataclass
class RayPool:
    """Keeps `launcher.workers` jobs in flight on actors that each hold a loaded backbone; implements tuners.jobs.Pool.

    Create it after `connect`. The driver submits while `idle() > 0` and collects with `wait()`.

    Raises:
        WorkerStartError: an actor could not start (from the constructor, before any job; or from `wait`, for a
            replacement).
        ClusterLostError: from `wait`, when no node is left to run the jobs.
    """

    cfg: SweepConfig
    reference: Reference | None
    free: list = field(default_factory=list)  # live actors without a job
    running: dict = field(default_factory=dict)  # evaluate() ref -> (_Running, actor)
    joining: dict = field(default_factory=dict)  # ping() ref -> replacement actor, until the cluster places it
    queue: deque = field(default_factory=deque)  # submitted or re-run jobs waiting for a free actor

    def __post_init__(self) -> None:
        la = self.cfg.launcher
        self._actor_cls = ray.remote(Worker).options(**actor_resources(la), max_restarts=0, max_task_retries=0)
        self._reference_ref = ray.put(self.reference)
        self._head = ray.get_runtime_context().gcs_address
        started = [self._spawn() for _ in range(la.workers)]
        try:
            ray.get([a.ping.remote() for a in started])  # surface load errors now, before any trial
        except RayActorError as err:
            for actor in started:
                ray.kill(actor)
            raise WorkerStartError(f"a Ray worker could not start: {_start_failure(err)}") from None
        self.free = started

    def _spawn(self):
        return self._actor_cls.remote(self.cfg, self._reference_ref)

    @property
    def actors(self) -> list:
        """Every actor of the pool: free, busy and joining."""
        return [*self.free, *(actor for _, actor in self.running.values()), *self.joining.values()]

    def idle(self) -> int:
        return self.cfg.launcher.workers - self.pending()

    def pending(self) -> int:
        return len(self.running) + len(self.queue)

    def submit(self, tag: int, job: Job) -> None:
        self.queue.append(_Running(tag, job))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free and self.queue:
            item, actor = self.queue.popleft(), self.free.pop()
            self.running[actor.evaluate.remote(item.job)] = (item, actor)

    def _replace(self, actor) -> None:
        """Drop a dead actor and start a replacement, which joins the pool once the cluster has placed it."""
        ray.kill(actor)  # an unavailable actor may still hold its resources
        self._check_cluster()
        fresh = self._spawn()
        self.joining[fresh.ping.remote()] = fresh

    def _check_cluster(self) -> None:
        """Raise ClusterLostError if the Ray head does not answer, or if no actor is live and no node could hold one."""
        try:
            _probe(self._head, self.cfg.launcher.connect_timeout_s)
            lost = None
        except ConnectionError:
            lost = f"the Ray cluster at {self._head} is gone (its head does not answer)"
        if lost is None and not self.free and not self.running and not _can_hold_a_worker(self.cfg.launcher):
            lost = f"no live node of the Ray cluster at {self._head} can hold a worker"
        if lost is not None:
            raise ClusterLostError(f"{lost}; start it again (`ray start`) and rerun the same command to resume")

    def wait(self) -> Done:
        """Block until one job finishes; a dead actor is replaced and its job re-run (bounded)."""
        while True:
            ready, _ = ray.wait([*self.running, *self.joining], num_returns=1, timeout=POLL_S)
            if not ready:
                self._check_cluster()
                continue
            [ref] = ready
            if ref in self.joining:
                self._joined(ref)
                continue
            item, actor = self.running.pop(ref)
            try:
                evaluation = ray.get(ref)
            except RayActorError as err:
                self._replace(actor)
                if item.retries < self.cfg.launcher.max_retries:
                    self.queue.appendleft(_Running(item.tag, item.job, item.retries + 1))
                    self._dispatch()
                    continue
                return Done(item.tag, None, f"worker died {item.retries + 1} times: {_reason(err)}", item.retries)
            except RayTaskError as err:
                self._release(actor)
                return Done(item.tag, None, _reason(err), item.retries)
            self._release(actor)
            return Done(item.tag, evaluation, None, item.retries)

    def _joined(self, ref: ray.ObjectRef) -> None:
        actor = self.joining.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as err:
            if err.actor_init_failed:  # e.g. placed on a node without the checkpoints
                raise WorkerStartError(f"a replacement Ray worker could not start: {_start_failure(err)}") from None
            self._replace(actor)  # its node died before it started
            return
        self._release(actor)

    def _release(self, actor) -> None:
        self.free.append(actor)
        self._dispatch()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.free, self.running, self.joining, self.queue = [], {}, {}, deque()
