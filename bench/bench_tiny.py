"""Quality of the embedded tiny backbone: tokenizer PSNR, and whether guidance matters (accuracy, FID).

For the unconditional branch, plain conditional sampling (w_cfg=0), a CFG grid and an IGG grid (global window),
it samples ``--n`` images with balanced labels and reports the accuracy of the shipped classifier and of the
shape-only classifier against the labels, and FID in the shipped classifier's feature space against real images
of the procedural generator. Real held-out images give the ceiling (accuracy) and floor (FID).

    python bench/bench_tiny.py --write            # writes docs/BENCHMARKS.md "## Embedded backbone"
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchdoc import BENCHMARKS, write_section
from torchvision.utils import make_grid, save_image

from pipeline.backbones.tiny import EVAL_SEED_OFFSET, TINY_VAE, TINY_VAR, load_vqvae, psnr
from pipeline.backbones.var import VARBackbone, load_var
from pipeline.core.sampling import sample
from pipeline.data.classifier import SHIPPED_SHAPE_CLASSIFIER, accuracy, load_classifier
from pipeline.data.shapes import CLASS_NAMES, NUM_CLASSES, make_batch
from pipeline.fid.fidelity import TINY_EXTRACTOR, FidEvaluator, shapes_source

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Embedded backbone"
BENCH_SEED = 2 * EVAL_SEED_OFFSET   # far from the training batches and from the recipe's own evaluation


@dataclass
class Setting:
    name: str
    w_cfg: float | None
    w_igg: float | None
    schedule: str = "linear"


def settings(cfg_grid: list[float], igg_grid: list[float]) -> list[Setting]:
    # Unconditional: t_cfg = 1 + 1·(-1) = 0 at every scale, i.e. the null-class logits alone.
    out = [Setting("unconditional", -1.0, None, "constant"), Setting("conditional (w_cfg=0)", 0.0, None)]
    out += [Setting(f"CFG w_cfg={w:g}", w, None) for w in cfg_grid if w != 0]
    out += [Setting(f"IGG w_igg={w:g}", None, w) for w in igg_grid]
    return out


@torch.no_grad()
def generate(backbone: VARBackbone, labels_N: torch.Tensor, s: Setting, seed: int, batch: int) -> torch.Tensor:
    chunks = [sample(backbone, labels_N[i:i + batch], w_cfg=s.w_cfg, w_igg=s.w_igg, schedule=s.schedule,
                     seed=seed + i).images for i in range(0, len(labels_N), batch)]
    return torch.cat(chunks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="samples per setting (balanced over the classes)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 8.0])
    p.add_argument("--igg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 8.0])
    p.add_argument("--reference", type=int, default=5000, help="real images of the FID reference")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md and docs/tiny_samples.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python bench/bench_tiny.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.monotonic()

    backbone = load_var(TINY_VAE, TINY_VAR)
    judge, shape_judge = load_classifier(), load_classifier(SHIPPED_SHAPE_CLASSIFIER)
    evaluator = FidEvaluator(TINY_EXTRACTOR, metrics=("fid",), batch_size=500, progress=False)
    reference = evaluator.reference(shapes_source(args.reference, BENCH_SEED, 500))

    labels_N = torch.arange(args.n) % NUM_CLASSES
    real_N3HW = make_batch(labels_N, BENCH_SEED + 1)
    vae = load_vqvae(TINY_VAE, backbone.patch_nums)
    rows = [("real images (held out)", accuracy(judge, real_N3HW, labels_N),
             accuracy(shape_judge, real_N3HW, labels_N), evaluator.score([real_N3HW], reference)["fid"])]
    tokenizer_psnr = psnr(vae, real_N3HW)
    print(f"tokenizer PSNR {tokenizer_psnr:.2f} dB; real: {rows[0][1:]}", flush=True)

    samples: dict[str, torch.Tensor] = {}
    for s in settings(args.cfg, args.igg):
        images = generate(backbone, labels_N, s, BENCH_SEED + 2, args.batch)
        samples[s.name] = images
        rows.append((s.name, accuracy(judge, images, labels_N), accuracy(shape_judge, images, labels_N),
                     evaluator.score([images], reference)["fid"]))
        print(f"{s.name}: accuracy {rows[-1][1]:.3f}, shape-only {rows[-1][2]:.3f}, FID {rows[-1][3]:.3f}",
              flush=True)

    cfg_rows = [r for r in rows if r[0].startswith("CFG")]
    best = max(cfg_rows, key=lambda r: r[1]) if cfg_rows else rows[2]
    minutes = (time.monotonic() - start) / 60
    lines = [
        f"Command: `{command}` ({minutes:.0f} min on this machine's CPU).",
        "",
        f"Tokenizer: PSNR {tokenizer_psnr:.2f} dB on {args.n} held-out generated images (32x32, all 7 scales).",
        "",
        f"{args.n} samples per row, labels balanced over the {NUM_CLASSES} classes, plain multinomial sampling "
        "(top_k=0, top_p=0), VAR's linear guidance ramp, IGG with a global window. Accuracy: the shipped "
        "classifier's arg-max equals the label; shape-only: the classifier trained on hue-randomised images. "
        f"FID: in the shipped classifier's feature space (`{TINY_EXTRACTOR}`) against {args.reference} real "
        "generator images.",
        "",
        "| setting | accuracy | shape-only accuracy | FID |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {acc:.3f} | {shape_acc:.3f} | {fid:.2f} |" for name, acc, shape_acc, fid in rows],
        "",
        f"Best CFG weight on this grid by accuracy: {best[0]}.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(BENCHMARKS, SECTION, body + "\n\n![samples per class](tiny_samples.png)\n\n"
                      "`docs/tiny_samples.png`: one row per class ("
                      + ", ".join(CLASS_NAMES) + f"); left 8 columns w_cfg=0, right 8 columns {best[0]}.")
        per_class = 8
        tiles = []
        for c in range(NUM_CLASSES):
            for name in ("conditional (w_cfg=0)", best[0]):
                tiles.append(samples[name][labels_N == c][:per_class])
        grid = make_grid(torch.cat(tiles), nrow=2 * per_class, padding=1, pad_value=1.0)
        save_image(torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0],
                   ROOT / "docs" / "tiny_samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
