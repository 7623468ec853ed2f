"""What a sweep shows: sample grids and guidance heat maps (PNG bytes), plots, best.yaml and report.md.

Rendering functions are pure (tensors/numbers in, PNG bytes out) so workers can call them; file writers are
atomic (temp file in the same folder, fsync, os.replace): a crash never leaves a half-written best.yaml.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from pipeline.files import atomic_write
from tuners.confirm import Confirmed

BEST_KEYS = ("backbone", "guidance", "w_cfg", "w_igg", "window", "fid", "gap", "spearman_rho")


def _png(image_HW3: Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HW3.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _figure_png(fig: Figure) -> bytes:
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
    return _figure_png(fig)


def gap_vs_fid_png(entries: list[Confirmed], rho: float) -> bytes:
    """Scatter of proxy gap vs small-N FID over the confirmed candidates."""
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    for entry in entries:
        if entry.small and math.isfinite(entry.gap):
            ax.scatter(entry.gap, entry.small["fid"], c={"proxy": "C0", "default": "C1"}.get(entry.role, "C2"))
            ax.annotate(entry.candidate.label(), (entry.gap, entry.small["fid"]), fontsize=6)
    ax.set_xlabel("equilibrium gap (proxy)")
    ax.set_ylabel("FID (small N)")
    ax.set_title(f"Spearman rho = {rho:.3f}" if math.isfinite(rho) else "Spearman rho: n/a", fontsize=9)
    return _figure_png(fig)


def signals_vs_weight_png(weight_name: str, rows: list[tuple[float, float, float]]) -> bytes:
    """Scaled evenness and divergence of the proxy trials against one guidance weight.

    Args:
        weight_name: the x axis (w_cfg or w_igg).
        rows: (weight, scaled E, scaled D) per proxy trial.
    """
    rows = sorted(rows)
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="scaled evenness E")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "s-", label="scaled divergence D")
    ax.set_xlabel(weight_name)
    ax.set_ylabel("min-max scaled over calibration")
    ax.legend(fontsize=8)
    return _figure_png(fig)


@dataclass
class Best:
    """The content of best.yaml."""

    backbone: str
    guidance: str
    w_cfg: float | None
    w_igg: float | None
    window: int | None
    fid: float
    gap: float
    spearman_rho: float

    def as_dict(self) -> dict:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {
            "backbone": self.backbone,
            "guidance": self.guidance,
            "w_cfg": num(self.w_cfg),
            "w_igg": num(self.w_igg),
            "window": self.window,
            "fid": num(self.fid),
            "gap": num(self.gap),
            "spearman_rho": num(self.spearman_rho),
        }


def write_best(path: str | Path, best: Best) -> Path:
    """best.yaml (keys BEST_KEYS), written atomically."""
    return atomic_write(path, yaml.safe_dump(best.as_dict(), sort_keys=False).encode())


def read_best(path: str | Path) -> Best:
    """Load and check a best.yaml; ValueError naming the problem if it is not one."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or set(data) != set(BEST_KEYS):
        keys = sorted(data) if isinstance(data, dict) else data
        raise ValueError(f"{path} is not a guidetune best.yaml (keys {keys}); rerun the sweep to write it")
    return Best(**{k: (math.nan if data[k] is None and k in ("fid", "gap", "spearman_rho") else data[k])
                   for k in BEST_KEYS})


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def report_markdown(title: str, entries: list[Confirmed], best: Confirmed, rho: float,
                    small_n: int, full_n: int) -> str:
    """report.md: one row per confirmed candidate, best first by FID."""
    lines = [
        f"# {title}",
        "",
        f"Best: **{best.candidate.label()}** ({best.role}), FID {_fmt(best.fid)}. "
        f"Spearman rho (gap vs FID@{small_n}): {_fmt(rho)}.",
        "",
        f"| candidate | role | w_cfg | w_igg | window | gap | FID@{small_n} | FID@{full_n} | IS | KID | precision "
        "| recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(entries, key=lambda e: (e.fid if math.isfinite(e.fid) else math.inf)):
        m = e.full or e.small or {}
        c = e.candidate
        window = "-" if c.w_igg is None else ("global" if c.window is None else str(c.window))
        lines.append(
            f"| {c.label()} | {e.role} | {_fmt(c.w_cfg, 2)} | {_fmt(c.w_igg, 2)} | {window} | {_fmt(e.gap)} "
            f"| {_fmt(e.small['fid'] if e.small else None)} | {_fmt(e.full['fid'] if e.full else None)} "
            f"| {_fmt(m.get('isc'))} | {_fmt(m.get('kid'), 4)} | {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} |"
        )
    return "\n".join(lines) + "\n"
