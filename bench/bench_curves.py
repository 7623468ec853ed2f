"""CFG and IGG curves of the embedded backbones (issue #14): FID against the guidance weight, per backbone.

Does IGG's gain over CFG grow with capacity, as the paper reports for VAR-d30 -> d36? Each backbone named by
``--backbones`` (its ``conf/backbone/<name>.yaml``: checkpoints, one source of truth) samples CFG at the weights
:data:`CFG_WEIGHTS` and global IGG at :data:`IGG_WEIGHTS`, ``--n`` images per point, with the protocol of
bench_grid.py (labels i % 8, batches of 64 seeded ``derive_seed(seed, b)``, FID in the shipped classifier's space
against 8000 real images of seed 7919, sampler seed 1000, which no sweep uses). Features are cached per backbone in
``<cache>/<backbone>/features`` and extended, never resampled; bench_grid.py's cache holds the same features for the
default backbone (copy them in to skip that sampling).

    python bench/bench_curves.py --backbones tiny tiny_small --write   # docs/BENCHMARKS.md, docs/curves.png
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench_grid import BATCH, GRID_SEEDS, REF_SEED, Point, _init_worker, load_features, make_point, sample_task
from benchdoc import ROOT, provenance, publish
from matplotlib.figure import Figure

from pipeline.backbones.var import load_var
from pipeline.config.schema import load_config
from pipeline.fid.fidelity import TINY_EXTRACTOR, FidEvaluator, shapes_source

SECTION = "Embedded backbones: CFG and IGG curves"
CFG_WEIGHTS = (0, 1, 1.5, 2, 3, 4, 6, 8, 10, 14, 20)
IGG_WEIGHTS = (1, 2, 3, 4, 6, 8, 10, 14, 20)
# FID's relative std between sampler seeds at N images on the default backbone (docs/BENCHMARKS.md, Reference grid)
REL_STD = {256: 0.181, 512: 0.167, 1024: 0.082, 2048: 0.041, 4096: 0.020}


def curve_points() -> list[Point]:
    return [make_point("cfg", w) for w in CFG_WEIGHTS] + [make_point("igg global", w) for w in IGG_WEIGHTS]


def sample_backbone(name: str, cache: Path, n: int, seed: int, workers: int) -> tuple[dict[str, str], float]:
    """Extend every curve point of backbone `name` to n images in `cache`; returns its checkpoints and seconds."""
    b = load_config([f"backbone={name}"]).backbone
    todo = [(str(cache), p, seed, n) for p in curve_points()
            if (have := load_features(cache, p, seed)) is None or len(have) < n]
    start = time.monotonic()
    if todo:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                          initargs=(1, b.vae_ckpt, b.var_ckpt)) as pool:
            for i, (p, _, _, spent) in enumerate(pool.imap_unordered(sample_task, todo), 1):
                print(f"[{name}] {i}/{len(todo)} {p.label()} ({spent:.0f} s)", flush=True)
    return {"vae_ckpt": b.vae_ckpt, "var_ckpt": b.var_ckpt}, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["tiny", "tiny_small"], help="conf/backbone names")
    p.add_argument("--cache", type=Path, default=Path("/work/curvecache"), help="results folder (one per backbone)")
    p.add_argument("--ref-cache", type=Path, default=None, help="reference statistics folder (<cache>/reference)")
    p.add_argument("--reference", type=int, default=8000, help="real images of the FID reference")
    p.add_argument("--n", type=int, default=1024, help="images per point")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "curves.png")
    p.add_argument("--write", action="store_true", help=f'write docs/BENCHMARKS.md "## {SECTION}" and --plot')
    args = p.parse_args(argv)
    if args.n not in REL_STD:
        p.error(f"--n must be one of {sorted(REL_STD)} (the image counts whose FID noise was measured), got {args.n}")
    seed = GRID_SEEDS[0]
    evaluator = FidEvaluator(TINY_EXTRACTOR, metrics=["fid"], batch_size=BATCH, progress=False,
                             cache_dir=args.ref_cache or args.cache / "reference")
    reference = evaluator.reference(shapes_source(args.reference, REF_SEED, BATCH))
    fids: dict[str, dict[Point, float]] = {}
    lines = []
    for name in args.backbones:
        ckpts, seconds = sample_backbone(name, args.cache / name, args.n, seed, args.workers)
        fids[name] = {q: float(evaluator.metrics_of({evaluator.feature_layer: torch.from_numpy(
            load_features(args.cache / name, q, seed)[:args.n])}, reference)["fid"]) for q in curve_points()}
        params = sum(t.numel() for t in load_var(ckpts["vae_ckpt"], ckpts["var_ckpt"]).var.parameters())
        lines.append(f"- `{name}`: {params / 1e6:.2f} M transformer parameters, {provenance(ckpts['var_ckpt'])}; "
                     + (f"sampled in this run: {seconds / 60:.1f} min" if seconds > 1 else "features from the cache"))
    command = "python bench/bench_curves.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    body = [f"Command: `{command.strip()}`  ",
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.workers} workers x 1 thread on this machine's CPU.", "",
            f"FID at N={args.n} per point (sampler seed {seed}, labels i % 8, against {args.reference} real images of "
            f"seed {REF_SEED}, in the shipped classifier's space; the protocol of the Reference grid). At this N "
            f"FID moves by about {REL_STD[args.n]:.0%} between sampler seeds on `tiny` (Reference grid, noise table): "
            "two points closer than that are not ranked by this table.", "", *lines, ""]
    body += ["| backbone | guidance | " + " | ".join(f"{w:g}" for w in sorted({*CFG_WEIGHTS, *IGG_WEIGHTS})) + " |",
             "|---|---|" + "---:|" * len({*CFG_WEIGHTS, *IGG_WEIGHTS})]
    for name, values in fids.items():
        for kind in ("cfg", "igg global"):
            by_w = {(q.w_cfg if kind == "cfg" else q.w_igg): v for q, v in values.items() if q.kind == kind}
            body.append(f"| {name} | {kind} | " + " | ".join(f"{by_w[w]:.2f}" if w in by_w else ""
                                                            for w in sorted({*CFG_WEIGHTS, *IGG_WEIGHTS})) + " |")
    body += ["", "| backbone | best CFG | best IGG | IGG ÷ CFG |", "|---|---|---|---:|"]
    for name, values in fids.items():
        best = {k: min((q for q in values if q.kind == k), key=values.get) for k in ("cfg", "igg global")}
        body.append(f"| {name} | {best['cfg'].label()}: {values[best['cfg']]:.2f} | "
                    f"{best['igg global'].label()}: {values[best['igg global']]:.2f} | "
                    f"{values[best['igg global']] / values[best['cfg']]:.3f} |")
    if args.write:
        fig = Figure(figsize=(10, 3.6))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, kind in zip(axes, ("cfg", "igg global"), strict=True):
            for name, values in fids.items():
                pts = sorted(((q.w_cfg if kind == "cfg" else q.w_igg), v) for q, v in values.items() if q.kind == kind)
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set(xlabel="w (CFG)" if kind == "cfg" else "w' (IGG, global)", title=kind.upper().split()[0],
                   yscale="log")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"FID at N={args.n}")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        body += ["", f"![CFG and IGG curves]({args.plot.name})"]
    publish("\n".join(body), SECTION, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
