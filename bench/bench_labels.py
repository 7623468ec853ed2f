"""Does FID depend on which class each sampler seed position gets? The same images' seeds under several label orders.

A sweep gives image i the label ``i·5 mod 8`` (``spread_labels``), the reference grid ``i mod 8``; each draws batch b
of 64 images with ``seed=derive_seed(seed, b)``. An image depends only on its own label and its own noise (tests:
``test_an_image_depends_only_on_its_own_label_and_noise``), so at one seed the orders ``i·m mod 8`` share the images
of every class that m maps to itself and redraw the others from other positions' noise; with independent noise
every order has the same expected FID. This samples one candidate's images ``--start`` .. ``--start + --n - 1`` at
each seed under each order and prints their FID in the shipped classifier's features against bench_grid.py's
reference (8,000 shapes, seed 7919), and the paired difference to order 1 (the grid's):

    python bench/bench_labels.py --w-igg 9.630274198089628 --seeds 1000 1001 --orders 1 3 5 7 \\
        --ref-cache /work/gridcache/reference
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from bench_grid import _W, BATCH, NUM_CLASSES, REF_SEED, _init_worker

from pipeline.core.sampling import sample
from pipeline.core.seeds import derive_seed
from pipeline.fid.fidelity import TINY_EXTRACTOR, FidEvaluator, shapes_source


def features_task(job: tuple[float | None, float | None, int, int, int, int]) -> tuple[int, int, np.ndarray]:
    """Features of images start..start+n-1 with labels i·order mod C at `seed` (batch b: derive_seed(seed, b))."""
    w_cfg, w_igg, seed, order, start, n = job
    parts = []
    for b in range(start // BATCH, (start + n) // BATCH):
        labels = torch.arange(b * BATCH, (b + 1) * BATCH) * order % NUM_CLASSES
        images = sample(_W["backbone"], labels, w_cfg=w_cfg, w_igg=w_igg, seed=derive_seed(seed, b),
                        with_signals=False).images
        parts.append(_W["evaluator"].features([images])[_W["evaluator"].feature_layer].numpy())
    return seed, order, np.concatenate(parts)


def weight(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--w-cfg", type=weight, default=None, help="CFG weight, or none (default none)")
    p.add_argument("--w-igg", type=weight, default=9.630274198089628, help="IGG weight, or none (default 9.63…)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    p.add_argument("--orders", type=int, nargs="+", default=[1, 3, 5, 7], help="m of the labels i·m mod 8 (odd)")
    p.add_argument("--start", type=int, default=2048, help="first image (a multiple of 64)")
    p.add_argument("--n", type=int, default=2048, help="images per (seed, order), a multiple of 64")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ref-cache", type=Path, default=None, help="reference statistics folder (bench_grid's)")
    args = p.parse_args(argv)
    if args.w_cfg is None and args.w_igg is None:
        p.error("give --w-cfg or --w-igg (or both)")
    if 1 not in args.orders or any(m % 2 == 0 for m in args.orders) or args.start % BATCH or args.n % BATCH:
        p.error("--orders must be odd and include 1; --start and --n multiples of 64")
    evaluator = FidEvaluator(TINY_EXTRACTOR, metrics=["fid"], batch_size=BATCH, progress=False,
                             cache_dir=args.ref_cache)
    reference = evaluator.reference(shapes_source(8000, REF_SEED, BATCH))

    def fid(features_NF: np.ndarray) -> float:
        return evaluator.metrics_of({evaluator.feature_layer: torch.from_numpy(features_NF)}, reference)["fid"]

    jobs = [(args.w_cfg, args.w_igg, s, m, args.start, args.n) for s in args.seeds for m in args.orders]
    with get_context("spawn").Pool(args.workers, _init_worker, (1,)) as pool:
        got = {(s, m): f for s, m, f in pool.imap_unordered(features_task, jobs)}
    print(f"w_cfg={args.w_cfg} w_igg={args.w_igg}, images {args.start}..{args.start + args.n - 1}, labels i*m mod "
          f"{NUM_CLASSES}, FID against 8,000 real images\n")
    print("| seed | m | classes kept in place | FID | − FID(m=1), same seeds |")
    print("|---:|---:|---|---:|---:|")
    for s in args.seeds:
        base = fid(got[(s, 1)])
        for m in args.orders:
            kept = [c for c in range(NUM_CLASSES) if c * m % NUM_CLASSES == c]
            same = np.all(got[(s, m)] == got[(s, 1)], axis=1)
            assert same[np.isin(np.arange(args.start, args.start + args.n) % NUM_CLASSES, kept)].all()
            value = fid(got[(s, m)])
            print(f"| {s} | {m} | {','.join(map(str, kept))} | {value:.3f} | {value - base:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
