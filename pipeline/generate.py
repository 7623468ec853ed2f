"""Sample one guidance setting as a sweep samples it: ``python -m pipeline.generate [key=value ...]``.

The configuration is the sweep's (conf/sweep.yaml, the same groups and keys) plus its ``generate`` section. With
``generate.best=<best.yaml>`` the winner of that sweep is sampled exactly: its backbone and checkpoints (refused when
their sha256 differs from the sweep's), weights, schedule with its interval, top-k/top-p, seed and batches, so the
first N images are the images the sweep scored. Writes ``<generate.out>/grid.png`` (the first ``generate.grid``
images) and ``<generate.out>/samples.npz`` (ADM-evaluator layout: ``arr_0`` uint8 [N, H, W, 3])::

    python -m pipeline.generate generate.best=mlruns/sweeps/tiny-auto/best.yaml generate.num_images=4096
    python -m pipeline.generate backbone=var_d16 generate.w_cfg=1.5 backbone.var_ckpt=ckpt/var_d16.pth
    python -m pipeline.generate generate.w_cfg=null generate.w_igg=3 generate.window=3 seed=1

Bad input: one line on stderr naming the key and the fix, exit code 2, nothing written.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import save_image

from pipeline.backbones.base import ScaleWiseBackbone, TextToImageBackbone
from pipeline.backbones.load import load_backbone
from pipeline.config.schema import ConfigError, SweepConfig, compose_config, to_schema
from pipeline.core.sampling import Sampling, check_sampling_args, seeded_batches
from pipeline.fid.fidelity import NpzWriter, file_digest
from pipeline.outputs.best import Best, read_best

BEST_KEY = "generate.best"
USAGE = f"""usage: python -m pipeline.generate [{BEST_KEY}=<best.yaml>] [group=option ...] [key=value ...]

Sample one guidance setting the way a sweep samples it (its labels, batches and seeds). With {BEST_KEY}, a sweep's
winner exactly: its backbone, checkpoints (their sha256 must match), weights and sampling. Keys of the generate
section: generate.w_cfg generate.w_igg generate.window (without a best.yaml) generate.num_images generate.grid
generate.nrow generate.device generate.out; any sweep key too (seed, backbone.*, guidance.schedule, ...).
Writes <generate.out>/grid.png and samples.npz (ADM layout); `python -m pipeline.sweep --help` lists the groups.
"""


def _value(v: object) -> str:
    """A Hydra override value: null, a number exactly, or a quoted string."""
    if v is None:
        return "null"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(v)


def winner_overrides(best: Best) -> list[str]:
    """Overrides that make the sweep's configuration sample `best`'s winner as the sweep did."""
    s, ckpt = best.sampling, best.checkpoints
    values = {"backbone.vae_ckpt": ckpt["vae_ckpt"].path, "backbone.var_ckpt": ckpt["var_ckpt"].path,
              "generate.w_cfg": best.w_cfg, "generate.w_igg": best.w_igg, "generate.window": best.window,
              "guidance.schedule": s.schedule, "guidance.schedule_start": s.schedule_start,
              "guidance.schedule_end": s.schedule_end, "backbone.top_k": s.top_k, "backbone.top_p": s.top_p,
              "seed": s.seed, "confirm.batch_size": s.batch_size,
              **{f"backbone.{k}": ckpt[k].path for k in ("text_encoder", "text_encoder_2") if k in ckpt},
              "backbone.last_scale_temp": s.last_scale_temp, "backbone.drop_uncond": s.drop_uncond,
              "backbone.tau": s.tau, "backbone.negative_prompt": s.negative_prompt,
              **({"backbone.prompts": s.prompts} if s.prompts is not None else {})}
    patch_nums = ",".join(map(str, s.patch_nums))
    return [f"backbone={best.backbone}", f"backbone.patch_nums=[{patch_nums}]",
            *(f"{k}={_value(v)}" for k, v in values.items())]


def configure(argv: list[str]) -> tuple[SweepConfig, Best | None]:
    """The composed, checked configuration (a best.yaml's winner first, the other overrides after it), and the
    best.yaml. Raises ConfigError."""
    given = [a for a in argv if a.startswith(f"{BEST_KEY}=")]
    best = None
    if given:
        path = given[-1].split("=", 1)[1]
        try:
            best = read_best(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{BEST_KEY}={path}: {err}; give the best.yaml a sweep printed (`best: <path>`)"
                              ) from None
    # the sweep's tree, type-checked; the checks of a search (ranges, rungs, workers) do not apply here
    cfg = to_schema(compose_config([*(winner_overrides(best) if best else []), *argv]))
    g = cfg.generate
    for key in ("num_images", "grid", "nrow"):
        if getattr(g, key) < 1:
            raise ConfigError(f"generate.{key}={getattr(g, key)} must be >= 1; e.g. generate.{key}=64")
    if cfg.confirm.batch_size < 1:
        raise ConfigError(f"confirm.batch_size={cfg.confirm.batch_size} must be >= 1; e.g. confirm.batch_size=64")
    try:
        check_sampling_args(cfg.backbone.top_k, cfg.backbone.top_p, g.window)
    except ValueError as err:
        raise ConfigError(f"{err}; e.g. generate.window=null") from None
    if best is not None:
        for key in best.checkpoints:
            path = getattr(cfg.backbone, key)
            digest = file_digest(path) if Path(path).exists() else "missing"
            if digest != best.checkpoints[key].sha256:
                raise ConfigError(f"backbone.{key}={path} (sha256 {digest[:12]}) is not the checkpoint the sweep "
                                  f"used (sha256 {best.checkpoints[key].sha256[:12]}); give that file")
    return cfg, best


def images(backbone: ScaleWiseBackbone | TextToImageBackbone, cfg: SweepConfig) -> Iterator[Tensor]:
    """The first generate.num_images images of the configured candidate, in batches (B, 3, H, W) in [0, 1]."""
    g = cfg.generate
    for _, result in seeded_batches(backbone, g.w_cfg, g.w_igg, g.window, num_images=g.num_images,
                                    batch_size=cfg.confirm.batch_size, seed=cfg.seed, sampling=Sampling.of(cfg)):
        yield result.images


def generate(cfg: SweepConfig) -> tuple[Path, Path]:
    """Sample and write; the paths of grid.png and samples.npz."""
    g = cfg.generate
    device = g.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = images(load_backbone(cfg.backbone, device=device), cfg)
    first = next(batches)  # its side is the backbone's image size
    out = Path(g.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_path, npz_path = out / "grid.png", out / "samples.npz"
    shown: list[Tensor] = []  # only the first generate.grid images stay in memory
    with NpzWriter(npz_path, num_images=g.num_images, height=first.shape[-2], width=first.shape[-1]) as npz:
        for start, batch in zip(itertools.count(0, cfg.confirm.batch_size), itertools.chain([first], batches)):
            npz.add(batch)
            if start < g.grid:
                shown.append(batch[: g.grid - start])
    save_image(torch.cat(shown), grid_path, nrow=g.nrow)
    return grid_path, npz_path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        print(USAGE, end="")
        return 0
    try:
        cfg, _ = configure(args)
        grid_path, npz_path = generate(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"grid: {grid_path}")
    print(f"samples: {npz_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
