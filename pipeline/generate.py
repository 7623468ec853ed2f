"""Generate guided samples: ``python -m pipeline.generate [key=value ...]``.

Writes ``<out>/grid.png`` (the first ``grid`` images) and ``<out>/samples.npz`` (ADM-evaluator layout: ``arr_0``
uint8 [N, H, W, 3]). Examples::

    python -m pipeline.generate                                   # embedded tiny backbone, its default CFG
    python -m pipeline.generate backbone=var_d16 w_cfg=1.5 n=64 vae_ckpt=ckpt/vae.pth var_ckpt=ckpt/var_d16.pth
    python -m pipeline.generate w_cfg=null w_igg=3 window=3 label=2 seed=1 out=outputs/igg

Keys: backbone (an option of conf/backbone: its checkpoints, top_k, top_p and default CFG are the defaults),
vae_ckpt, var_ckpt, w_cfg (default: the backbone's published CFG; null drops the term), w_igg, window, schedule,
n, batch_size, label (null: labels cycle over the classes), seed (batch b uses seed + b), top_k, top_p, grid,
nrow, device (null: cuda if available), out. Bad values exit with code 2 and one line naming the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torchvision.utils import save_image

from pipeline.backbones.var import load_var
from pipeline.config import CONF_DIR, group_options
from pipeline.fid import NpzWriter
from pipeline.guidance import SCHEDULES
from pipeline.sampling import check_sampling_args, sample


@dataclass
class GenerateConfig:
    backbone: str = "tiny"
    vae_ckpt: str | None = None           # null: the backbone's
    var_ckpt: str | None = None
    w_cfg: float | None = None            # when not given: the backbone's default_cfg
    w_igg: float | None = None
    window: int | None = None
    schedule: str = "linear"
    n: int = 16
    batch_size: int = 16
    label: int | None = None
    seed: int = 0
    top_k: int | None = None              # null: the backbone's
    top_p: float | None = None
    grid: int = 64                        # images in grid.png
    nrow: int = 8
    device: str | None = None
    out: str = "outputs/generate"


def parse_args(argv: list[str]) -> GenerateConfig:
    """``key=value`` arguments -> a typed config with the backbone's defaults filled in. Raises ValueError."""
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r} is not key=value (e.g. w_cfg=1.5)")
    try:
        given = OmegaConf.from_dotlist(argv)
        cfg = OmegaConf.merge(OmegaConf.structured(GenerateConfig), given)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"{key + ': ' if key else ''}{str(err).strip().splitlines()[0]}") from None
    options = group_options("backbone")
    if cfg.backbone not in options:
        raise ValueError(f"backbone={cfg.backbone} is unknown; choose one of {', '.join(options)}")
    preset = OmegaConf.load(CONF_DIR / "backbone" / f"{cfg.backbone}.yaml")
    for key, preset_key in (("vae_ckpt", "vae_ckpt"), ("var_ckpt", "var_ckpt"), ("top_k", "top_k"),
                            ("top_p", "top_p"), ("w_cfg", "default_cfg")):
        if key not in given:
            cfg[key] = preset[preset_key]
    result: GenerateConfig = OmegaConf.to_object(cfg)
    for key in ("n", "batch_size", "grid", "nrow"):
        if getattr(result, key) < 1:
            raise ValueError(f"{key}={getattr(result, key)} must be >= 1")
    if result.schedule not in SCHEDULES:
        raise ValueError(f"schedule={result.schedule} is unknown; choose one of {', '.join(SCHEDULES)}")
    check_sampling_args(result.top_k, result.top_p, result.window)
    return result


def labels_for(cfg: GenerateConfig, num_classes: int) -> torch.Tensor:
    """(n,) labels: ``label`` repeated, or 0, 1, ..., num_classes - 1, 0, 1, ... (balanced classes)."""
    if cfg.label is not None:
        return torch.full((cfg.n,), cfg.label, dtype=torch.int64)
    return torch.arange(cfg.n) % num_classes


def generate(cfg: GenerateConfig) -> tuple[Path, Path]:
    """Sample ``cfg.n`` images; return the paths of grid.png and samples.npz."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_var(cfg.vae_ckpt, cfg.var_ckpt, device=device)
    labels = labels_for(cfg, backbone.num_classes)
    side = backbone.vae.cfg.image_size
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_path, npz_path = out / "grid.png", out / "samples.npz"
    grid_images = []
    with NpzWriter(npz_path, num_images=cfg.n, height=side, width=side) as npz:
        for b, start in enumerate(range(0, cfg.n, cfg.batch_size)):
            result = sample(backbone, labels[start:start + cfg.batch_size], w_cfg=cfg.w_cfg, w_igg=cfg.w_igg,
                            window=cfg.window, schedule=cfg.schedule, top_k=cfg.top_k, top_p=cfg.top_p,
                            seed=cfg.seed + b)
            npz.add(result.images)
            if start < cfg.grid:
                grid_images.append(result.images[:cfg.grid - start])
    save_image(torch.cat(grid_images), grid_path, nrow=cfg.nrow)
    return grid_path, npz_path


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        grid_path, npz_path = generate(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"grid: {grid_path}")
    print(f"samples: {npz_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
