"""FID confirmation stage on torch-fidelity: streamed features, cached reference statistics, ADM-evaluator files.

Generated images arrive in batches from the sampler, are quantised to uint8 exactly as
``torchvision.utils.save_image`` writes PNG pixels (:func:`to_uint8`), and go through a torch-fidelity feature
extractor in memory. FID, Inception Score, KID and precision/recall are torch-fidelity's own functions applied
to those features, so the numbers equal ``torch_fidelity.calculate_metrics`` on the same images saved as PNGs.

Feature extractors (torch-fidelity registry names):

- ``inception-v3-compat``: torch-fidelity's port of the TF Inception the ADM evaluator uses; its pool3 space
  is the one of the ``mu``/``sigma`` in the evaluator's reference files (VIRTUAL_imagenet256_labeled.npz).
  ``weights_path`` points it at a local weights file on offline machines.
- ``guidetune-tiny`` (registered here): the embedded backbone's ShapeClassifier (pipeline/data/classifier.py);
  its penultimate ``features`` for FID/KID/PRC and its ``logits`` for IS.

FID, KID and precision/recall share one layer (the extractor's FID layer), as in the ADM evaluator.

Reference sources: an ADM evaluator ``.npz`` (its ``mu``/``sigma`` used as they are; its ``arr_0`` images for
KID/PRC, or for the statistics when the file has none); a folder of images (what torch-fidelity reads from a
folder); any iterable of image batches named by a content key (:class:`BatchSource`, e.g. the embedded shapes
dataset, :func:`shapes_source`). Statistics computed from images are cached on disk under a name derived from
the content (file hash; folder listing with sizes and mtimes; the source key) and from the extractor (name,
weights hash, layer, torch-fidelity version), written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np
import torch
import torch_fidelity
import torchvision.transforms.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, glob_samples_paths
from tqdm import tqdm

from pipeline.config.schema import EMBEDDED_REFERENCE, FID_METRICS
from pipeline.data.classifier import SHIPPED_CLASSIFIER, load_classifier
from pipeline.data.files import atomic_write, load_weights
from pipeline.data.shapes import SHAPES_VERSION, ShapesConfig, iter_batches

METRICS = FID_METRICS  # torch-fidelity's metrics that confirm.metrics may name
REFERENCE_METRICS = ("fid", "kid", "prc")  # metrics that compare with a reference set
INCEPTION = "inception-v3-compat"
TINY_EXTRACTOR = "guidetune-tiny"
NPZ_IMAGES = "arr_0"  # the ADM evaluator's image array: uint8 [N, H, W, 3]
IMAGE_EXTENSIONS = DEFAULTS["samples_find_ext"]  # the files torch-fidelity reads from a folder
SHORT_NAMES = {  # torch-fidelity's result keys -> the names this project logs
    KEY_METRIC_FID: "fid",
    KEY_METRIC_ISC_MEAN: "isc",
    KEY_METRIC_ISC_STD: "isc_std",
    KEY_METRIC_KID_MEAN: "kid",
    KEY_METRIC_KID_STD: "kid_std",
    KEY_METRIC_PRECISION: "precision",
    KEY_METRIC_RECALL: "recall",
    KEY_METRIC_F_SCORE: "f_score",
}


# ---------------------------------------------------------------------------------------------- images


def _check_B3HW(images_B3HW: Tensor) -> None:
    if not torch.is_tensor(images_B3HW) or images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3:
        shape = tuple(images_B3HW.shape) if torch.is_tensor(images_B3HW) else type(images_B3HW).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}; pass RGB batches channel-first")


def to_uint8(images_B3HW: Tensor) -> Tensor:
    """Quantise images the way ``torchvision.utils.save_image`` writes PNG pixels: ⌊255·clamp(x) + 0.5⌋.

    Args:
        images_B3HW: (B, 3, H, W) float in [0, 1] (values outside are clamped), or uint8 (returned as is).

    Returns:
        (B, 3, H, W) uint8 on the input's device.
    """
    _check_B3HW(images_B3HW)
    if images_B3HW.dtype == torch.uint8:
        return images_B3HW
    if not images_B3HW.is_floating_point():
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images_B3HW.dtype}; convert them first")
    if not torch.isfinite(images_B3HW).all():
        raise ValueError("images contain NaN or inf; check the sampler output before scoring it")
    return images_B3HW.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------- ADM-evaluator .npz


def _temp_beside(path: Path) -> Path:
    """A unique temporary name in ``path``'s folder (same file system, so ``os.replace`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


class NpzWriter:
    """Stream images into an ADM-evaluator ``.npz`` (``arr_0``: uint8 [N, H, W, 3]) without holding them all.

    The file appears at ``path`` only when exactly ``num_images`` images were added and the block exited
    cleanly (written to a temporary file, then ``os.replace``); ``np.load(path)["arr_0"]`` reads it back.

    Usage::

        with NpzWriter("samples.npz", num_images=50_000, height=256, width=256) as npz:
            for labels_b in chunks:
                npz.add(sample(backbone, labels_b, ...).images)
    """

    def __init__(self, path: str | Path, num_images: int, height: int, width: int):
        if num_images < 1 or height < 1 or width < 1:
            raise ValueError(f"NpzWriter needs num_images, height, width >= 1; got {num_images}, {height}, {width}")
        self.path = Path(path)
        self.shape_NHW3 = (num_images, height, width, 3)
        self.written = 0

    def __enter__(self) -> NpzWriter:
        self._tmp = _temp_beside(self.path)
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open(f"{NPZ_IMAGES}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape_NHW3}
        np.lib.format.write_array_header_1_0(self._member, header)
        return self

    def add(self, images_B3HW: Tensor) -> None:
        """Append a batch: (B, 3, H, W) float in [0, 1] (quantised by :func:`to_uint8`) or uint8."""
        self.add_nhwc(to_uint8(images_B3HW).permute(0, 2, 3, 1).cpu().numpy())

    def add_nhwc(self, images_BHW3: np.ndarray) -> None:
        """Append a batch already in the file's layout: uint8 (B, H, W, 3)."""
        _, H, W, _ = self.shape_NHW3
        if images_BHW3.dtype != np.uint8 or images_BHW3.shape[1:] != (H, W, 3):
            raise ValueError(f"images for {self.path} must be uint8 (B, {H}, {W}, 3), got {images_BHW3.dtype} "
                             f"{images_BHW3.shape}; every image of one file must have the same size")
        if self.written + len(images_BHW3) > self.shape_NHW3[0]:
            raise ValueError(f"{self.path} was opened for {self.shape_NHW3[0]} images; adding {len(images_BHW3)} "
                             f"after {self.written} is too many; open it with the right num_images")
        self._member.write(np.ascontiguousarray(images_BHW3).tobytes())
        self.written += len(images_BHW3)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._member.close()
            self._zip.close()
            if exc_type is None and self.written != self.shape_NHW3[0]:
                raise ValueError(f"{self.path}: {self.written} of {self.shape_NHW3[0]} images were added; "
                                 f"add them all or open the writer with num_images={self.written}")
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)


def save_npz(path: str | Path, images_NHW3: np.ndarray | Tensor) -> None:
    """Write ``images_NHW3`` (uint8 [N, H, W, 3]) as an ADM-evaluator ``.npz`` (key ``arr_0``), atomically."""
    images = images_NHW3.cpu().numpy() if torch.is_tensor(images_NHW3) else np.asarray(images_NHW3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"save_npz needs uint8 [N, H, W, 3] images with N >= 1, got {images.dtype} {images.shape}; "
                         "convert float (B, 3, H, W) batches with to_uint8(x).permute(0, 2, 3, 1)")
    with NpzWriter(path, *images.shape[:3]) as npz:
        npz.add_nhwc(images)


NPZ_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError)


def _not_an_npz(path: str | Path, e: Exception) -> ValueError:
    return ValueError(f"{path} cannot be read as an .npz ({type(e).__name__}); give an ADM-evaluator .npz written "
                      "by numpy.savez or save_npz")


@contextmanager
def _read_npz(path: str | Path) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an ``.npz`` archive; a missing, unreadable or corrupt file gives one ValueError naming it."""
    try:
        npz = np.load(path)
    except (*NPZ_READ_ERRORS, ValueError) as e:
        raise _not_an_npz(path, e) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one .npy array, not an .npz archive; give an ADM-evaluator .npz")
    with npz:
        try:
            yield npz
        except NPZ_READ_ERRORS as e:
            raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e}); re-export or re-download it") from None


def load_npz(path: str | Path) -> np.ndarray:
    """Read the ``arr_0`` images (uint8 [N, H, W, 3]) of an ADM-evaluator ``.npz`` into memory."""
    with _read_npz(path) as npz:
        if NPZ_IMAGES not in npz.files:
            raise ValueError(f"{path} has no {NPZ_IMAGES} images (keys: {npz.files}); write it with save_npz")
        images = npz[NPZ_IMAGES]
    _check_npz_images(path, images.shape, images.dtype)
    return images


def _check_npz_images(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: {NPZ_IMAGES} must be uint8 [N, H, W, 3] (ADM evaluator layout), got {dtype} "
                         f"{shape}; re-export it with save_npz")


@contextmanager
def _open_npz_images(path: str | Path) -> Iterator[tuple[IO[bytes], tuple[int, ...]]]:
    """Open the ``arr_0`` member of an ``.npz`` past its header: (stream of raw rows, shape)."""
    try:
        archive = zipfile.ZipFile(path)
    except NPZ_READ_ERRORS as e:
        raise _not_an_npz(path, e) from None
    with archive:
        member = f"{NPZ_IMAGES}.npy"
        if member not in archive.namelist():
            raise ValueError(f"{path} has no {NPZ_IMAGES} images; give an ADM-evaluator .npz with images")
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(f)
            _check_npz_images(path, shape, dtype)
            if fortran_order:
                raise ValueError(f"{path}: {NPZ_IMAGES} is stored in Fortran order; re-export it with save_npz")
            yield f, shape


def npz_image_shape(path: str | Path) -> tuple[int, ...]:
    """(N, H, W, 3) of the ``arr_0`` images of an ``.npz``, read from the header only."""
    with _open_npz_images(path) as (_, shape):
        return shape


def iter_npz_images(path: str | Path, batch_size: int) -> Iterator[Tensor]:
    """Stream the ``arr_0`` images of an ``.npz`` as (B, 3, H, W) uint8 batches, reading one batch at a time."""
    with _open_npz_images(path) as (f, shape):
        n, row_bytes = shape[0], math.prod(shape[1:])
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            buffer = f.read(b * row_bytes)
            if len(buffer) != b * row_bytes:
                raise ValueError(f"{path} is truncated ({start + len(buffer) // row_bytes} of {n} images)")
            images_BHW3 = np.frombuffer(buffer, dtype=np.uint8).reshape(b, *shape[1:])
            yield torch.from_numpy(images_BHW3.copy()).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------- feature extractors


class TinyFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of the embedded ShapeClassifier (registered as ``guidetune-tiny``).

    Input (B, 3, H, W) uint8; features ``features`` (B, F) penultimate layer (FID/KID/PRC) and ``logits``
    (B, C) (IS). ``feature_extractor_weights_path``: a ``save_classifier`` file; None = the shipped one.
    """

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: str | None = None, **kwargs: object):
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x_B3HW: Tensor) -> tuple[Tensor, ...]:
        if x_B3HW.dtype != torch.uint8:
            raise ValueError(f"{self.name} expects uint8 (B, 3, H, W) images, got {x_B3HW.dtype}; use to_uint8")
        features_BF = self.classifier.features(x_B3HW.float() / 255)
        out = {"features": features_BF, "logits": self.classifier.head(features_BF)}
        return tuple(out[name] for name in self.features_list)


if TINY_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TINY_EXTRACTOR, TinyFeatureExtractor)


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and mtime within the process); of a folder (a Hub
    checkpoint), SHA-256 of the sorted lines ``<relative path> <file sha256>`` of the files under it."""
    if Path(path).is_dir():
        root = Path(path)
        lines = [f"{p.relative_to(root).as_posix()} {file_digest(p)}" for p in sorted(root.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    stat = os.stat(path)
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_plain_state_dict(path: str | Path) -> None:
    """Refuse a weights file that needs arbitrary unpickling (torch-fidelity itself loads without that check)."""
    state = load_weights(path, what="weights", fix="save a plain state dict: torch.save(model.state_dict(), PATH)")
    if not isinstance(state, dict):
        raise ValueError(f"weights {path} hold a {type(state).__name__}, not a state dict; "
                         "save one with torch.save(model.state_dict(), PATH)")


# -------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricOptions:
    """Arguments of torch-fidelity's metric functions; the defaults are torch-fidelity's own."""

    isc_splits: int = DEFAULTS["isc_splits"]
    kid_subsets: int = DEFAULTS["kid_subsets"]
    kid_subset_size: int = DEFAULTS["kid_subset_size"]  # capped at the smaller of the two image counts
    prc_neighborhood: int = DEFAULTS["prc_neighborhood"]
    prc_batch_size: int = DEFAULTS["prc_batch_size"]
    rng_seed: int = DEFAULTS["rng_seed"]  # IS shuffling and KID subsets


@dataclass
class Reference:
    """Reference statistics in one feature space.

    mu: (F,) float64 and sigma: (F, F) float64, the FID statistics. features: (N, F) float32 features of the
    reference images (KID, precision/recall), None when the source held only mu/sigma. num_images: N, or None
    when unknown (an ADM file's own statistics). key: content key of source and extractor (the cache name).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: Tensor | None  # (N, F)
    num_images: int | None
    key: str
    from_cache: bool = False


@dataclass(frozen=True)
class BatchSource:
    """Reference images from any iterable of (B, 3, H, W) batches, float in [0, 1] or uint8.

    ``key`` must name the content: change it whenever the images change (it is the cache key). ``batches`` is
    called only when the statistics are not cached; ``num_batches`` sizes the progress bar.
    """

    key: str
    batches: Callable[[], Iterable[Tensor]]
    num_batches: int | None = None


ReferenceSource = str | Path | BatchSource


def shapes_source(num_images: int, seed: int, batch_size: int) -> BatchSource:
    """The embedded procedural dataset (pipeline/data/shapes.py, default ShapesConfig, balanced labels)."""
    key = f"shapes-v{SHAPES_VERSION}-n{num_images}-seed{seed}-bs{batch_size}-{ShapesConfig()!r}"
    return BatchSource(key, lambda: (x for x, _ in iter_batches(num_images, seed, batch_size)),
                       math.ceil(num_images / batch_size))


def reference_source(spec: str, *, num_images: int, seed: int, batch_size: int) -> ReferenceSource:
    """Map ``confirm.reference`` to a source: ``shapes`` = the embedded dataset (num_images, seed), else a path."""
    return shapes_source(num_images, seed, batch_size) if spec == EMBEDDED_REFERENCE else Path(spec)


def _as_float64(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: mu must be (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}; "
                         "use a reference file written by the ADM evaluator or guidetune")
    return mu, sigma


class FidEvaluator:
    """Scores image sets against a reference with torch-fidelity; one instance per worker (loads the extractor once).

    Args:
        extractor: torch-fidelity feature extractor name (``inception-v3-compat``, ``guidetune-tiny``, ...).
        metrics: subset of ``fid``, ``isc``, ``kid``, ``prc``.
        weights_path: local weights of the extractor (None: torch-fidelity's download / the shipped classifier).
        device: where the extractor runs.
        batch_size: images per extractor call (batches from the caller are split to this size).
        cache_dir: folder of cached reference statistics (None: no disk cache).
        options: torch-fidelity metric arguments.
        progress: show a tqdm bar over batches.
        image_size: the images' shorter side is resized to this (Lanczos, as PIL) and the centre square kept before
            the extractor sees them, as Switti's evaluation does for its 256 px statistics; None: as given.
    """

    def __init__(self, extractor: str = INCEPTION, *, metrics: Sequence[str] = ("fid",),
                 weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, cache_dir: str | Path | None = None,
                 options: MetricOptions | None = None, progress: bool = True, image_size: int | None = None):
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown or not metrics:
            raise ValueError(f"metrics {list(metrics)}: choose a non-empty subset of {', '.join(METRICS)}")
        if extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature extractor {extractor!r} is not registered; choose one of "
                             f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}; e.g. batch_size=64")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None, got {image_size}; e.g. image_size=256")
        self.image_size = image_size
        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise ValueError(f"feature extractor weights {weights_path} not found; give an existing file or None")
            if extractor != TINY_EXTRACTOR:  # the embedded classifier loader checks its own file
                _check_plain_state_dict(weights_path)
        self.extractor, self.metrics = extractor, tuple(dict.fromkeys(metrics))
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.options = options or MetricOptions()
        extractor_cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
        self.feature_layer = extractor_cls.get_default_feature_layer_for_metric("fid")
        self.isc_layer = extractor_cls.get_default_feature_layer_for_metric("isc")
        layers = [self.feature_layer]
        if "isc" in self.metrics and self.isc_layer != self.feature_layer:
            layers.append(self.isc_layer)
        weights = None if weights_path is None else str(weights_path)
        self.model = create_feature_extractor(extractor, layers, cuda=False, verbose=progress,
                                              feature_extractor_weights_path=weights).to(self.device)
        if weights is not None:
            weights_id = file_digest(weights)
        elif extractor == TINY_EXTRACTOR:
            weights_id = file_digest(SHIPPED_CLASSIFIER)
        elif extractor == INCEPTION:
            weights_id = URL_INCEPTION_V3
        else:
            weights_id = "torch-fidelity default"
        resized = "" if image_size is None else f"|resized to {image_size}"
        self.extractor_key = _short_hash(
            f"{extractor}|{weights_id}|{self.feature_layer}|torch-fidelity {torch_fidelity.__version__}{resized}")

    # ----------------------------------------------------------------------------------- features

    @torch.no_grad()
    def features(self, batches: Iterable[Tensor], *, total: int | None = None,
                 desc: str = "features") -> dict[str, Tensor]:
        """Extract features of a stream of (B, 3, H, W) batches (float in [0, 1] or uint8), in memory.

        Returns {layer: (N, F_layer) float32 on CPU} for the FID layer (and the IS layer when IS is scored).
        Features of several calls can be concatenated per layer (multi-fidelity: extend a small-N set).
        """
        chunks: dict[str, list[Tensor]] = {layer: [] for layer in self.model.get_requested_features_list()}
        bar = tqdm(batches, total=total, desc=desc, unit="batch", disable=not self.progress, leave=False)
        for images_B3HW in bar:
            for x_B3HW in self._resized(to_uint8(images_B3HW)).split(self.batch_size):
                out = self.model.convert_features_tuple_to_dict(self.model(x_B3HW.to(self.device)))
                for layer, features_BF in out.items():
                    chunks[layer].append(features_BF.float().cpu())
        if not chunks[self.feature_layer]:
            raise ValueError("no images to score: the batch iterable was empty; pass at least one (B, 3, H, W) batch")
        return {layer: torch.cat(parts) for layer, parts in chunks.items()}

    def _resized(self, uint8_B3HW: Tensor) -> Tensor:
        """The images at ``image_size`` (shorter side, Lanczos, centre crop); unchanged without one."""
        if self.image_size is None or min(uint8_B3HW.shape[-2:]) == self.image_size == max(uint8_B3HW.shape[-2:]):
            return uint8_B3HW
        out = []
        for x_3HW in uint8_B3HW.cpu():
            image = TF.to_pil_image(x_3HW)
            image = TF.resize(image, self.image_size, interpolation=TF.InterpolationMode.LANCZOS)
            out.append(TF.pil_to_tensor(TF.center_crop(image, self.image_size)))
        return torch.stack(out).to(uint8_B3HW.device)

    # ---------------------------------------------------------------------------------- reference

    def reference(self, source: ReferenceSource) -> Reference:
        """Reference statistics of an ADM ``.npz``, an image folder or a :class:`BatchSource`, cached on disk."""
        if isinstance(source, BatchSource):
            return self._cached(f"src-{_short_hash(source.key)}",
                                lambda: self._reference_from(source.batches(), source.num_batches))
        path = Path(source)
        if path.is_file() and path.suffix == ".npz":
            return self._npz_reference(path)
        if path.is_dir():
            files = glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)
            if not files:
                raise ValueError(f"reference folder {path} holds no {IMAGE_EXTENSIONS} images; "
                                 "point confirm.reference at a folder of real images")
            listing = "\n".join(f"{os.path.basename(f)}\t{os.stat(f).st_size}\t{os.stat(f).st_mtime_ns}"
                                for f in files)
            loader = DataLoader(ImagesPathDataset(files), batch_size=self.batch_size)
            return self._cached(f"dir-{_short_hash(listing)}", lambda: self._reference_from(loader, len(loader)))
        raise ValueError(f"reference {source} is neither an .npz file nor a folder of images; give an ADM-evaluator "
                         f".npz, a folder of PNG/JPEG images or '{EMBEDDED_REFERENCE}'")

    @property
    def _needs_reference_features(self) -> bool:
        return "kid" in self.metrics or "prc" in self.metrics

    def _npz_reference(self, path: Path) -> Reference:
        with _read_npz(path) as npz:
            keys = set(npz.files)
            if len({"mu", "sigma"} & keys) == 1:
                raise ValueError(f"reference {path} has {'mu' if 'mu' in keys else 'sigma'} but not "
                                 f"{'sigma' if 'mu' in keys else 'mu'}; FID needs both (ADM evaluator reference file)")
            has_stats, has_images = "mu" in keys, NPZ_IMAGES in keys
            if not has_stats and not has_images:
                raise ValueError(f"reference {path} has no mu/sigma (FID statistics) and no {NPZ_IMAGES} images "
                                 f"(keys: {sorted(keys)}); give an ADM-evaluator reference .npz")
            stats = _as_float64(npz["mu"], npz["sigma"], str(path)) if has_stats else None
        if has_stats and not has_images and self._needs_reference_features:
            raise ValueError(f"reference {path} has no {NPZ_IMAGES} images, which kid/prc need; "
                             "drop kid and prc from confirm.metrics or use a reference .npz with images")
        source_key = f"npz-{file_digest(path)[:16]}"
        if stats is not None and not self._needs_reference_features:
            return Reference(*stats, features=None, num_images=None, key=f"{source_key}-{self.extractor_key}")

        def compute() -> Reference:
            total = math.ceil(npz_image_shape(path)[0] / self.batch_size)
            ref = self._reference_from(iter_npz_images(path, self.batch_size), total)
            if stats is not None:  # the file's own statistics are the ones the published numbers use
                ref.mu, ref.sigma, ref.num_images = *stats, None
            return ref

        return self._cached(source_key, compute)

    def _reference_from(self, batches: Iterable[Tensor], total: int | None) -> Reference:
        features_NF = self.features(batches, total=total, desc="reference")[self.feature_layer]
        stats = fid_features_to_statistics(features_NF)
        mu, sigma = _as_float64(stats["mu"], stats["sigma"], "reference")
        return Reference(mu, sigma, features=features_NF, num_images=len(features_NF), key="")

    def _cached(self, source_key: str, compute: Callable[[], Reference]) -> Reference:
        key = f"{source_key}-{self.extractor_key}"
        path = None if self.cache_dir is None else self.cache_dir / f"{key}.pt"
        if path is not None and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                return Reference(blob["mu"].numpy(), blob["sigma"].numpy(), features=blob["features"],
                                 num_images=blob["num_images"], key=key, from_cache=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError):
                pass  # unreadable (foreign or damaged file): recomputed and overwritten below
        ref = compute()
        ref.key = key
        if path is not None:
            blob = {"mu": torch.from_numpy(ref.mu), "sigma": torch.from_numpy(ref.sigma),
                    "features": ref.features, "num_images": ref.num_images,
                    "extractor": self.extractor, "source_key": source_key}
            atomic_write(path, lambda f: torch.save(blob, f))
        return ref

    # ------------------------------------------------------------------------------------ scoring

    def metrics_of(self, features: dict[str, Tensor], reference: Reference | None,
                   metrics: Sequence[str] | None = None) -> dict[str, float]:
        """torch-fidelity metrics of extracted features against a reference (None allowed for IS alone).

        Keys are the short names of torch-fidelity's results (:data:`SHORT_NAMES`): ``fid``, ``isc``,
        ``isc_std``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``f_score``. `metrics` narrows the
        evaluator's metrics for this call (e.g. ``["fid"]``).
        """
        o, out = self.options, {}
        chosen = self.metrics if metrics is None else tuple(m for m in metrics if m in self.metrics)
        generated_NF = features[self.feature_layer]
        if "isc" in chosen:
            out.update(isc_features_to_metric(features[self.isc_layer], o.isc_splits, True, o.rng_seed))
        if not any(m in chosen for m in REFERENCE_METRICS):
            return {SHORT_NAMES[key]: value for key, value in out.items()}
        if reference is None:
            raise ValueError(f"metrics {', '.join(chosen)} need a reference; pass evaluator.reference(...)")
        F, F_ref = generated_NF.shape[1], reference.mu.shape[0]
        if F_ref != F:
            raise ValueError(f"feature dimensions differ: {self.extractor} gives {F}, the reference {reference.key} "
                             f"has {F_ref}; score against a reference made with the same extractor")
        if "fid" in chosen:
            for what, n in (("generated", len(generated_NF)), ("reference", reference.num_images)):
                if n is not None and n <= F:
                    raise ValueError(f"FID needs more {what} images than the feature dimension ({n} <= {F} for "
                                     f"{self.extractor}): the covariance is singular; use at least {F + 1} images")
            stats = fid_features_to_statistics(generated_NF)
            mu, sigma = _as_float64(stats["mu"], stats["sigma"], "generated")
            out.update(fid_statistics_to_metric({"mu": mu, "sigma": sigma},
                                                {"mu": reference.mu, "sigma": reference.sigma}, verbose=False))
        if "kid" in chosen or "prc" in chosen:
            reference_NF = reference.features
            if reference_NF is None:
                raise ValueError(f"kid/prc need reference images, but {reference.key} holds only mu/sigma; "
                                 "drop kid and prc or use a reference with images")
            if "kid" in chosen:
                subset = min(o.kid_subset_size, len(generated_NF), len(reference_NF))
                out.update(kid_features_to_metric(generated_NF, reference_NF, kid_subsets=o.kid_subsets,
                                                  kid_subset_size=subset, rng_seed=o.rng_seed, verbose=False))
            if "prc" in chosen:
                out.update(prc_features_to_metric(generated_NF, reference_NF, prc_neighborhood=o.prc_neighborhood,
                                                  prc_batch_size=o.prc_batch_size, save_cpu_ram=True,
                                                  verbose=False))
        return {SHORT_NAMES[key]: value for key, value in out.items()}

    def score(self, batches: Iterable[Tensor], reference: Reference | None, *,
              total: int | None = None) -> dict[str, float]:
        """Extract features of generated batches in memory and score them: :meth:`metrics_of` of :meth:`features`."""
        return self.metrics_of(self.features(batches, total=total, desc="generated"), reference)

