"""Procedural class-conditional shapes: the data of the embedded ("tiny") backbone.

Each image is one foreground object whose *kind* is the class (disk, ring, square, ...) drawn at a random
position, size and rotation over a low-contrast textured background (gradient + stripes + noise) that does
not depend on the class. Classes come in pairs that share a hue family, so colour alone cannot tell them
apart; with ``hue_random=True`` the object's hue is uniform over the colour wheel (the data of the
shape-only classifier).

Everything is computed on the fly from a seed; nothing is written to disk. Image ``i`` of
``make_batch(labels, seed)`` depends only on ``seed``, ``i`` and ``labels[i]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

SHAPES_VERSION = "2"
"""Bumped whenever the images of a given (seed, labels) change; part of every cache key built on this data."""

OBJECT_EXTENT = 1.2
"""Largest distance from the object centre reached by any class's shape, in radii (the frame's corners)."""

CLASS_NAMES = ("disk", "square", "ring", "frame", "triangle", "plus", "half_disk", "crescent")
NUM_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class ShapesConfig:
    """What defines the distribution. Fractions are of the image side; hues are on [0, 1)."""

    size: int = 32
    radius_range: tuple[float, float] = (0.19, 0.31)
    family_hues: tuple[float, ...] = (0.0, 0.6, 0.33, 0.13)  # classes 2j and 2j+1 share family_hues[j]
    hue_jitter: float = 0.04
    fg_saturation: tuple[float, float] = (0.6, 0.95)
    fg_value: tuple[float, float] = (0.75, 1.0)
    bg_saturation: tuple[float, float] = (0.0, 0.25)
    bg_value: tuple[float, float] = (0.25, 0.5)
    gradient_amplitude: float = 0.12
    stripe_amplitude: float = 0.06
    stripe_period: tuple[float, float] = (0.12, 0.4)
    noise_std: float = 0.03


def _length(u: Tensor, v: Tensor) -> Tensor:
    return torch.sqrt(u * u + v * v)


def _box(u: Tensor, v: Tensor, bu: float, bv: float) -> Tensor:
    """Signed distance to an axis-aligned box of half-sizes (bu, bv)."""
    du, dv = u.abs() - bu, v.abs() - bv
    outside = _length(du.clamp(min=0), dv.clamp(min=0))
    return outside + torch.maximum(du, dv).clamp(max=0)


def _disk(u: Tensor, v: Tensor) -> Tensor:
    return _length(u, v) - 1.0


def _square(u: Tensor, v: Tensor) -> Tensor:
    return _box(u, v, 0.8, 0.8)


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (_length(u, v) - 0.72).abs() - 0.28


def _frame(u: Tensor, v: Tensor) -> Tensor:
    return (_box(u, v, 0.68, 0.68)).abs() - 0.17


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral triangle centred on its centroid, circumradius ~1.04."""
    r, k = 0.9, math.sqrt(3.0)
    pu, pv = u.abs() - r, v + r / k
    fold = pu + k * pv > 0
    pu, pv = torch.where(fold, (pu - k * pv) / 2, pu), torch.where(fold, (-k * pu - pv) / 2, pv)
    pu = pu - pu.clamp(-2 * r, 0.0)
    return -_length(pu, pv) * torch.sign(pv)


def _plus(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))


def _half_disk(u: Tensor, v: Tensor) -> Tensor:
    v = v + 0.4
    return torch.maximum(_length(u, v) - 1.0, -v)


def _crescent(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(_length(u, v) - 1.0, -(_length(u - 0.5, v) - 0.75))


_SDFS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    _disk, _square, _ring, _frame, _triangle, _plus, _half_disk, _crescent,
)


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(...,) hue/saturation/value in [0, 1] -> (..., 3) RGB in [0, 1]."""
    k_3 = torch.tensor([5.0, 3.0, 1.0], device=h.device)
    k = (k_3 + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _uniform(g: torch.Generator, B: int, lo_hi: tuple[float, float]) -> Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(B, generator=g)


def make_batch(labels: Tensor, seed: int, *, hue_random: bool = False,
               config: ShapesConfig | None = None) -> Tensor:
    """Render one image per label.

    labels: (B,) int64 in [0, NUM_CLASSES). Returns (B, 3, S, S) float32 in [0, 1], S = config.size.
    """
    cfg = config or ShapesConfig()
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}); got min {int(labels.min())}, "
                         f"max {int(labels.max())}")
    B, S = labels.numel(), cfg.size
    g = torch.Generator().manual_seed(int(seed))
    # Every draw has a fixed shape per image, so image i never depends on the other labels.
    # Per-image scalars are kept as (B, 1, 1) to broadcast over the pixel grid.
    radius = (_uniform(g, B, cfg.radius_range) * S)[:, None, None]
    margin = radius * OBJECT_EXTENT + 1.0
    cx = margin + (S - 2 * margin) * torch.rand(B, 1, 1, generator=g)
    cy = margin + (S - 2 * margin) * torch.rand(B, 1, 1, generator=g)
    angle = 2 * math.pi * torch.rand(B, 1, 1, generator=g)
    jitter_B = cfg.hue_jitter * (2 * torch.rand(B, generator=g) - 1)
    free_hue_B = torch.rand(B, generator=g)
    fg_sat_B, fg_val_B = _uniform(g, B, cfg.fg_saturation), _uniform(g, B, cfg.fg_value)
    bg_rgb_B3 = hsv_to_rgb(torch.rand(B, generator=g), _uniform(g, B, cfg.bg_saturation),
                           _uniform(g, B, cfg.bg_value))
    grad_angle = 2 * math.pi * torch.rand(B, 1, 1, generator=g)
    grad_amp = cfg.gradient_amplitude * torch.rand(B, 1, 1, generator=g)
    stripe_angle = math.pi * torch.rand(B, 1, 1, generator=g)
    stripe_period = (_uniform(g, B, cfg.stripe_period) * S)[:, None, None]
    stripe_phase = 2 * math.pi * torch.rand(B, 1, 1, generator=g)
    stripe_amp = cfg.stripe_amplitude * torch.rand(B, 1, 1, generator=g)
    noise_BHW = cfg.noise_std * torch.randn(B, S, S, generator=g)

    family_hues = torch.tensor(cfg.family_hues)
    hue_B = (free_hue_B if hue_random else family_hues[labels // 2] + jitter_B) % 1.0
    fg_rgb_B3 = hsv_to_rgb(hue_B, fg_sat_B, fg_val_B)

    xy = torch.arange(S, dtype=torch.float32) + 0.5
    y_HW, x_HW = torch.meshgrid(xy, xy, indexing="ij")

    # Background: base colour + linear gradient + sinusoidal stripes + pixel noise (luminance only).
    grad_BHW = ((x_HW - S / 2) * torch.cos(grad_angle) + (y_HW - S / 2) * torch.sin(grad_angle)) / S
    proj_BHW = x_HW * torch.cos(stripe_angle) + y_HW * torch.sin(stripe_angle)
    stripes_BHW = torch.sin(2 * math.pi * proj_BHW / stripe_period + stripe_phase)
    texture_BHW = 2 * grad_amp * grad_BHW + stripe_amp * stripes_BHW + noise_BHW
    bg_B3HW = bg_rgb_B3[:, :, None, None] + texture_BHW[:, None]

    # Foreground: the class signed distance in the object frame (units of radius), anti-aliased.
    dx, dy = x_HW - cx, y_HW - cy
    u_BHW = (dx * torch.cos(angle) + dy * torch.sin(angle)) / radius
    v_BHW = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / radius
    sdf_BHW = torch.empty(B, S, S)
    for c, sdf in enumerate(_SDFS):
        rows = labels == c
        if rows.any():
            sdf_BHW[rows] = sdf(u_BHW[rows], v_BHW[rows])
    alpha_B1HW = (0.5 - sdf_BHW * radius).clamp(0.0, 1.0)[:, None]
    fg_B3HW = fg_rgb_B3[:, :, None, None] + 0.5 * noise_BHW[:, None]
    return (alpha_B1HW * fg_B3HW + (1 - alpha_B1HW) * bg_B3HW).clamp(0.0, 1.0)


def random_labels(n: int, seed: int) -> Tensor:
    """(n,) int64 labels, uniform over the classes, seeded."""
    return torch.randint(NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(int(seed)))


def iter_batches(n: int, seed: int, batch_size: int, *, hue_random: bool = False,
                 config: ShapesConfig | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``n`` real images as ((b, 3, S, S) float [0, 1], (b,) int64 labels) batches, labels balanced.

    Image ``i`` has label ``i mod NUM_CLASSES``; batch ``j`` is rendered with seed ``seed * 1_000_003 + j``,
    so the sequence is fixed by (SHAPES_VERSION, seed, n, batch_size, hue_random, config).
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1; got n={n}, batch_size={batch_size}")
    for j, start in enumerate(range(0, n, batch_size)):
        labels_b = torch.arange(start, min(n, start + batch_size)) % NUM_CLASSES
        yield make_batch(labels_b, seed * 1_000_003 + j, hue_random=hue_random, config=config), labels_b
