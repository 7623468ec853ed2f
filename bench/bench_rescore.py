"""FID of sampled image files on the Reference grid's protocol: an answer scored on images the sweep never saw.

A sweep scores its winner on its hold-out images (the race's last rung), or, before `confirm.holdout`, on the images
that chose it (README, What the numbers mean). To see how far that FID sits from the point's own, sample the winner
again on other seeds and score those images here, in the shipped
classifier's features against bench_grid.py's reference (8,000 procedural shapes, seed 7919, cached under
``--ref-cache``):

    python -m pipeline.generate generate.best=RUN/best.yaml generate.num_images=4096 generate.out=/tmp/own
    python -m pipeline.generate generate.best=RUN/best.yaml seed=5 generate.num_images=4096 generate.out=/tmp/s5
    python bench/bench_rescore.py /tmp/own/samples.npz /tmp/s5/samples.npz --ref-cache /work/gridcache/reference

(``seed=`` after ``generate.best`` replaces the winner's sampler seed.) Prints one line per file: its images and
FID, and FID over the first 1024 and 2048 of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bench_grid import BATCH, REF_SEED

from pipeline.fid.fidelity import TINY_EXTRACTOR, FidEvaluator, iter_npz_images, shapes_source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("npz", type=Path, nargs="+", help="samples.npz files (pipeline.generate's ADM layout)")
    p.add_argument("--reference", type=int, default=8000, help="real images of the FID reference (the grid's)")
    p.add_argument("--ref-cache", type=Path, default=None, help="reference statistics folder (bench_grid's)")
    args = p.parse_args(argv)
    evaluator = FidEvaluator(TINY_EXTRACTOR, metrics=["fid"], batch_size=BATCH, progress=False,
                             cache_dir=args.ref_cache)
    reference = evaluator.reference(shapes_source(args.reference, REF_SEED, BATCH))
    for path in args.npz:
        features_NF = evaluator.features(iter_npz_images(path, BATCH))[evaluator.feature_layer]
        fids = {n: evaluator.metrics_of({evaluator.feature_layer: features_NF[:n]}, reference)["fid"]
                for n in (1024, 2048, len(features_NF)) if n <= len(features_NF)}
        print(f"{path}: {len(features_NF)} images, FID {fids[len(features_NF)]:.3f} "
              f"({', '.join(f'{v:.3f} at {n}' for n, v in fids.items() if n < len(features_NF))})", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
