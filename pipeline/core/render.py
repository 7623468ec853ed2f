"""Pictures, pure: tensors and numbers in, PNG bytes out (workers render their sample grids and heat maps here; the
driver its plots). Nothing here reads or writes a file."""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def _png(image_HW3: Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HW3.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def sample_grid_png(images_B3HW: Tensor, nrow: int) -> bytes:
    """A grid of images (B, 3, H, W) float in [0, 1], `nrow` per row, as PNG bytes (pixels as save_image writes)."""
    grid_3HW = make_grid(images_B3HW.float().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    return _png(grid_3HW.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0))


def heatmap_png(magnitude_per_scale: list[Tensor], title: str) -> bytes:
    """Guidance heat map: per-token nudge magnitude of a few images (rows) at every scale after the first (columns).

    Args:
        magnitude_per_scale: K tensors (n, pn_k, pn_k), the per-token L2 norm of guided - uncond.
        title: figure title (the candidate).
    """
    scales = magnitude_per_scale[1:] or magnitude_per_scale
    n = scales[0].shape[0]
    fig = Figure(figsize=(1.3 * len(scales), 1.3 * n + 0.4))
    axes = fig.subplots(n, len(scales), squeeze=False)
    for col, maps in enumerate(scales):
        for row in range(n):
            ax = axes[row][col]
            ax.imshow(maps[row].float().numpy(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{maps.shape[-1]}x{maps.shape[-1]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def signals_vs_weight_png(weight_name: str, rows: list[tuple[float, float, float]]) -> bytes:
    """Evenness and divergence of the proxy trials against one guidance weight (natural units).

    Args:
        weight_name: the x axis (w_cfg or w_igg).
        rows: (weight, E, D) per proxy trial.
    """
    rows = sorted(rows)
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o", label="evenness E")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "s", label="divergence D (bits)")
    ax.set_xlabel(weight_name)
    ax.set_ylabel("E and D")
    ax.legend(fontsize=8)
    return figure_png(fig)


def log_weight_axis(ax: Axes, cap: float) -> None:
    """An x axis in u = log(1 + w), the screen's spacing, with ticks at readable weights up to `cap`."""
    ax.set_xscale("function", functions=(lambda w: np.log1p(np.maximum(w, 0)), np.expm1))
    ticks = [t for t in (0.25, 1, 2, 3, 5, 8, 12, 20, 30, 50, 100) if t <= cap] + [cap]
    ax.set_xticks(sorted(set(ticks)), [f"{t:g}" for t in sorted(set(ticks))])
