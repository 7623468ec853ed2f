"""Ray side of a sweep: the worker that evaluates guidance candidates, and the actor pool the driver keeps busy.

Each actor loads the backbone (and the FID feature extractor) once, then evaluates jobs: it samples the images,
reduces the per-scale signals to numbers, scores FID in memory, and renders a sample grid and a guidance heat map
as PNG bytes. Actors never write to a store; the driver logs what they return. On a machine with GPUs each actor
takes one (``launcher.gpus_per_worker``); otherwise ``launcher.cpus_per_worker`` CPUs. An actor that dies is
replaced and its job re-run on the fresh one, at most ``launcher.max_retries`` times.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from torch import Tensor

from pipeline.backbones.var import load_var
from pipeline.config import LauncherConfig, SweepConfig
from pipeline.fid import FidEvaluator, Reference
from pipeline.metrics import trial_mean
from pipeline.report import heatmap_png, sample_grid_png
from pipeline.sampling import sample
from tuners.jobs import SIGNALS, Done, Evaluation, Job
from tuners.samplers import derive_seed


def spread_labels(num_images: int, num_classes: int) -> Tensor:
    """(N,) labels, label i = i·P mod C with P ≈ 0.618·C coprime to C.

    Every C consecutive images hold each class once, any prefix is spread over the classes (a golden-ratio
    sequence), and the labels of N images are a prefix of those of more: a larger N extends a smaller one.
    """
    step = max(1, round(0.618 * num_classes))
    while math.gcd(step, num_classes) != 1:
        step += 1
    return torch.arange(num_images) * step % num_classes


def _reason(err: BaseException) -> str:
    """One line: the exception type and the last line of its message (Ray puts the cause last)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


class Worker:
    """Evaluates jobs on one backbone loaded once (a Ray actor in the sweep; a plain object in tests).

    Args:
        cfg: the sweep configuration (backbone, guidance schedule, batch sizes, FID settings).
        reference: FID reference statistics (None: the worker cannot run FID jobs).
    """

    def __init__(self, cfg: SweepConfig, reference: Reference | None = None):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.launcher.cpus_per_worker)
        self.backbone = load_var(cfg.backbone.vae_ckpt, cfg.backbone.var_ckpt, device=self.device)
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
            )

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
        return evaluation

    def _evaluate(self, job: Job) -> Evaluation:
        cfg, c = self.cfg, job.candidate
        batch_size = cfg.confirm.batch_size if job.fid else cfg.proxy.batch_size
        if job.start % batch_size:
            raise ValueError(f"job starts at image {job.start}, not at a batch boundary of {batch_size}")
        labels_N = spread_labels(job.num_images, self.backbone.num_classes)
        first = job.start // batch_size
        K = len(self.backbone.patch_nums)
        per_scale: dict[str, list[list[Tensor]]] = {name: [[] for _ in range(K)] for name in SIGNALS}
        shown: dict[str, object] = {}

        def batches() -> Iterator[Tensor]:
            for b, labels_B in enumerate(labels_N.split(batch_size)[first:], start=first):
                result = sample(
                    self.backbone,
                    labels_B,
                    w_cfg=c.w_cfg,
                    w_igg=c.w_igg,
                    window=c.window,
                    schedule=cfg.guidance.schedule,
                    interval_start=cfg.guidance.schedule_start,
                    interval_end=cfg.guidance.schedule_end,
                    top_k=cfg.backbone.top_k,
                    top_p=cfg.backbone.top_p,
                    seed=derive_seed(job.seed, b),
                    with_signals=b == first or not job.fid,
                )
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
    """Join the cluster at launcher.address, or start a local Ray; True when this call started Ray.

    Raises:
        ConnectionError: the address did not answer within launcher.connect_timeout_s.
    """
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
    if launcher.address is None:
        ray.init(
            num_cpus=launcher.num_cpus or launcher.workers * launcher.cpus_per_worker,
            object_store_memory=launcher.object_store_memory,
            **quiet,
        )
        return True
    if launcher.address != "auto":
        _probe(launcher.address, launcher.connect_timeout_s)
    try:
        ray.init(address=launcher.address, **quiet)
    except ConnectionError as err:
        raise ConnectionError(
            f"launcher.address={launcher.address}: {err}; start a cluster with `ray start --head` "
            "or set launcher.address=null for a local Ray"
        ) from None
    return False


def actor_resources(launcher: LauncherConfig) -> dict[str, int]:
    """Ray resources of one actor: its CPUs, and one GPU (gpus_per_worker) when the cluster has GPUs."""
    options = {"num_cpus": launcher.cpus_per_worker}
    if ray.cluster_resources().get("GPU", 0):
        options["num_gpus"] = launcher.gpus_per_worker
    return options


def check_capacity(launcher: LauncherConfig) -> None:
    """Raise ValueError if the connected cluster cannot place every actor (Ray would wait for them forever)."""
    have = ray.cluster_resources()
    for option, per_worker in actor_resources(launcher).items():
        kind = {"num_cpus": "CPU", "num_gpus": "GPU"}[option]
        need, available = launcher.workers * per_worker, have.get(kind, 0)
        if need > available:
            raise ValueError(
                f"launcher.workers={launcher.workers} needs {need:g} {kind} but the Ray cluster has {available:g}; "
                f"lower launcher.workers or launcher.{kind.lower()}s_per_worker"
            )


@dataclass
class _Running:
    tag: int
    job: Job
    actor: ray.actor.ActorHandle
    retries: int = 0


@dataclass
class RayPool:
    """`launcher.workers` actors, each holding a loaded backbone; implements tuners.jobs.Pool.

    Create it after `connect`. The driver submits while `idle() > 0` and collects with `wait()`.
    """

    cfg: SweepConfig
    reference: Reference | None
    actors: list = field(default_factory=list)
    free: list = field(default_factory=list)
    running: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        la = self.cfg.launcher
        self._actor_cls = ray.remote(Worker).options(**actor_resources(la), max_restarts=0, max_task_retries=0)
        self._reference_ref = ray.put(self.reference)
        self.actors = [self._spawn() for _ in range(la.workers)]
        ray.get([a.ping.remote() for a in self.actors])  # surface load errors now, before any trial
        self.free = list(self.actors)

    def _spawn(self):
        return self._actor_cls.remote(self.cfg, self._reference_ref)

    def idle(self) -> int:
        return len(self.free)

    def pending(self) -> int:
        return len(self.running)

    def submit(self, tag: int, job: Job) -> None:
        actor = self.free.pop()
        self._start(_Running(tag, job, actor))

    def _start(self, item: _Running) -> None:
        self.running[item.actor.evaluate.remote(item.job)] = item

    def wait(self) -> Done:
        """Block until one job finishes; a dead actor is replaced and its job re-run (bounded)."""
        while True:
            [ref], _ = ray.wait(list(self.running), num_returns=1)
            item = self.running.pop(ref)
            try:
                evaluation = ray.get(ref)
            except RayActorError as err:
                fresh = self._spawn()
                self.actors = [fresh if a is item.actor else a for a in self.actors]
                if item.retries < self.cfg.launcher.max_retries:
                    self._start(_Running(item.tag, item.job, fresh, item.retries + 1))
                    continue
                self.free.append(fresh)
                return Done(item.tag, None, f"worker died {item.retries + 1} times: {_reason(err)}", item.retries)
            except RayTaskError as err:
                self.free.append(item.actor)
                return Done(item.tag, None, _reason(err), item.retries)
            self.free.append(item.actor)
            return Done(item.tag, evaluation, None, item.retries)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.free, self.running = [], [], {}
