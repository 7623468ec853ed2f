"""Answer quality and cost of the sweep (issue #13): is the sweep's answer the optimum a dense grid finds?

Runs ``python -m pipeline.sweep`` with the defaults for each sweep seed (and the variants given: a narrow starting
range, no proxy stage), reads each best.yaml, then re-measures every answer exactly as bench/bench_grid.py measures
its grid (labels i % 8, grid sampler seeds that no sweep uses, 4,096 images per seed, FID against 8,000 real images
of a seed no sweep uses), so an answer and the grid best are scored on the same seeds (common random numbers).
Reported: answer FID ÷ grid-best FID per seed measured (``--answer-seeds``, default the grid's first; the grid best
has all three) and their mean, the sweep's images and worker seconds, and a RandAR-style grid scaled to this
backbone as the cost baseline.

    python bench/bench_answer.py --seeds 0 1 2 3 4 --variant narrow --variant no-proxy@0,1,2 \
        --answer-seeds 1000 1001 1002 --grid-best "igg global:10" --write

Needs bench/bench_grid.py's results (``--cache``, default /work/gridcache) for the grid best, or ``--grid-best``
naming the point the Reference grid found (then only it is sampled, at the grid's seeds). Sweep roots are kept
under ``--runs``, so a rerun resumes the sweeps and re-samples nothing already measured.

``--backbone NAME`` (default tiny) runs the sweeps with ``backbone=NAME``, re-measures their answers with that
backbone's checkpoints (a sweep whose best.yaml names another backbone or other checkpoint files is refused; an
``--earlier`` answer of another backbone is left out, one on other checkpoint files re-measured as is, with a note)
and reads that backbone's grid (default ``--cache``: /work/gridcache_small for tiny_small, see
bench_grid.default_cache; default ``--runs``: /work/answercache_small); its section is "Answer quality (NAME)".

    python bench/bench_answer.py --backbone tiny_small --seeds 0 1 2 --answer-seeds 1000 1001 1002
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml
from bench_grid import (
    DEFAULT_BACKBONE,
    GRID_SEEDS,
    NUM_CLASSES,
    RUNGS,
    Grid,
    Point,
    Setting,
    default_cache,
    make_point,
    section_name,
)
from benchdoc import ROOT, publish

from pipeline.core.metrics import bootstrap_fid, resample_counts
from pipeline.fid.fidelity import file_digest

SECTION = "Answer quality"  # the default backbone's; another's is "Answer quality (NAME)"
DEFAULT_RUNS = Path("/work/answercache")
VARIANTS = {  # name -> overrides on top of the defaults
    "default": [],
    "narrow": ["search.w_cfg=[0,3]", "search.w_igg=[0,3]"],
    "no-proxy": ["search.n_trials=0"],
}
BASELINE_WEIGHTS = [2.0 + 0.5 * i for i in range(13)]  # RandAR's 2.0..8.0 step 0.2 at 10k, scaled: step 0.5
BASELINE_N, BASELINE_BEST_N = 2048, 8192  # scaled from 10k per point and 50k for the best


def point_of(best: dict) -> Point:
    """The grid's name for a best.yaml answer."""
    kind, window = best["kind"], best["window"]
    if kind != "cfg":
        kind = f"{kind} {'global' if window is None else f'window {window}'}"
    return Point(kind, best["w_cfg"], best["w_igg"], best["window"])


def noise_check(grid: Grid, points: list[Point], n_full: int, replicates: int = 200) -> list[str]:
    """Table rows: at each rung N, the std of FID over the grid seeds and over disjoint blocks of N images vs the
    sweep's bootstrap std, over all images and inside each class (stratified, the sweep's default), relative to the
    FID (mean over points and seeds): the interval the sweep prints is ±1.96 of the bootstrap's."""
    mu, sigma = torch.from_numpy(grid.reference.mu), torch.from_numpy(grid.reference.sigma)
    rows = []
    for n in [r for r in RUNGS if r <= n_full]:
        seed_rel, block_rel, plain_rel, strat_rel = [], [], [], []
        for p in points:
            fids = [grid.fid(p, s, n) for s in GRID_SEEDS]
            seed_rel.append(statistics.stdev(fids) / statistics.mean(fids))
            blocks = [grid.fid(p, s, n, start) for s in GRID_SEEDS for start in range(0, n_full - n + 1, n)]
            if len(blocks) > len(GRID_SEEDS):
                block_rel.append(statistics.stdev(blocks) / statistics.mean(blocks))
            for s, fid in zip(GRID_SEEDS, fids, strict=True):
                feats = torch.from_numpy(grid.features(p, s)[:n])
                labels = torch.arange(n) % NUM_CLASSES  # the grid's labels
                for strata, out in ((None, plain_rel), (labels, strat_rel)):
                    counts = resample_counts(n, replicates, s, strata)
                    out.append(float(bootstrap_fid(feats, mu, sigma, counts).std()) / fid)

        def pct(values: list[float]) -> str:
            return f"{100 * statistics.mean(values):.1f} %" if values else "-"

        rows.append(f"| {n} | {pct(seed_rel)} | {pct(block_rel)} | {pct(plain_rel)} | {pct(strat_rel)} |")
    return rows


def backbone_mismatch(name: str, best: dict, ckpts: dict[str, str]) -> str | None:
    """Why an answer was not found on backbone `name` with the checkpoint files `ckpts` (the ones the
    re-measurement samples), from its best.yaml's backbone and checkpoint sha256s; None when it was."""
    if best["backbone"] != name:
        return f"the sweep ran backbone {best['backbone']!r}, this run re-measures {name!r}"
    for key, ck in (best.get("checkpoints") or {}).items():
        if key in ckpts and ck.get("sha256") != file_digest(ckpts[key]):
            return (f"the sweep's {key} (sha256 {str(ck.get('sha256'))[:12]}, {ck.get('path')}) is not "
                    f"{ckpts[key]}, which the re-measurement samples")
    return None


def rho_cell(best: dict) -> str:
    """The sweep's ρ(gap, FID) over its screened points, with its interval ("-" before the screen existed)."""
    r = best.get("proxy_rho")
    return "-" if not r else f"{r['value']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"


def stage_costs(bests: list[dict]) -> list[str]:
    """Table rows: per stage of the default sweeps, images and worker seconds, mean (min-max)."""
    stages = list(dict.fromkeys(k for b in bests for k in b["cost"]))
    lines = [f"Cost per stage over the {len(bests)} default sweeps, mean (min-max):", "",
             "| stage | images | worker s |", "|---|---:|---:|"]
    for stage in stages:
        cells = []
        for key in ("images", "worker_s"):
            values = [b["cost"][stage][key] for b in bests if stage in b["cost"]]
            cells.append(f"{statistics.mean(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})")
        lines.append(f"| {stage} | {cells[0]} | {cells[1]} |")
    return lines


def variant_arg(text: str) -> tuple[str, list[int]]:
    """``name`` or ``name@s1,s2,...``: a variant and its sweep seeds (none given: the first of --seeds)."""
    name, _, seeds = text.partition("@")
    choices = ", ".join(sorted(set(VARIANTS) - {"default"}))
    if name not in VARIANTS or name == "default":
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; choose {choices}")
    return name, [int(x) for x in seeds.split(",") if x]


def run_sweep(runs: Path, name: str, seed: int, overrides: list[str], backbone: str = DEFAULT_BACKBONE
              ) -> tuple[dict, float]:
    """Run one sweep, or read it when it has finished before (``<root>/wall_s`` holds the wall seconds of the run
    that finished it); its best.yaml and those wall seconds."""
    root = runs / name
    best_path, wall_path = root / "sweeps" / name / "best.yaml", root / "wall_s"
    if best_path.is_file() and wall_path.is_file():
        return yaml.safe_load(best_path.read_text()), float(wall_path.read_text())
    cmd = [sys.executable, "-m", "pipeline.sweep", f"root={root}", f"sweep.name={name}", f"seed={seed}",
           f"backbone={backbone}", *overrides]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    wall = time.time() - started
    wall_path.write_text(f"{wall:.1f}\n")
    path = Path(proc.stdout.strip().splitlines()[-1].removeprefix("best: "))
    return yaml.safe_load(path.read_text()), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="sweep seeds (default variant)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[@SEED,...]", type=variant_arg,
                   help=f"also run this variant ({', '.join(sorted(set(VARIANTS) - {'default'}))}) at these sweep "
                        "seeds (default: the first of --seeds), e.g. no-proxy@0,1,2")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="conf/backbone/NAME.yaml: the sweeps' backbone, sampled again for the re-measurement")
    p.add_argument("--cache", type=Path, default=None,
                   help="bench_grid.py results of that backbone (default: bench_grid.default_cache(NAME), "
                        "/work/gridcache for tiny, /work/gridcache_small for tiny_small)")
    p.add_argument("--runs", type=Path, default=None,
                   help=f"sweep roots, kept (default {DEFAULT_RUNS}; another backbone's {DEFAULT_RUNS}_small for "
                        f"tiny_small, {DEFAULT_RUNS}_NAME)")
    p.add_argument("--n", type=int, default=4096, help="images per grid seed for the re-measurement")
    p.add_argument("--earlier", type=Path, default=None,
                   help="also re-measure the answers of finished sweeps under this folder (earlier settings), as is")
    p.add_argument("--answer-seeds", type=int, nargs="+", default=list(GRID_SEEDS[:1]),
                   help=f"grid seeds each answer is re-measured at (of {GRID_SEEDS})")
    p.add_argument("--grid-best", default=None, metavar="KIND:W[:W']",
                   help="the grid best as the Reference grid found it (e.g. 'igg global:10'), sampled at every grid "
                        "seed when the cache lacks it; default: the cache's own best three-seed point")
    p.add_argument("--write", action="store_true",
                   help=f'write docs/BENCHMARKS.md "## {SECTION}" (another backbone: "## {SECTION} (NAME)")')
    Setting.add_arguments(p, "the sweeps and the re-measurement of their answers, against a grid sampled so "
                             "(bench_grid.py with the same option; give its --cache and a --runs of their own)")
    args = p.parse_args(argv)
    args.cache = args.cache or default_cache(args.backbone)
    args.runs = args.runs or (DEFAULT_RUNS if args.backbone == DEFAULT_BACKBONE else DEFAULT_RUNS.with_name(
        f"{DEFAULT_RUNS.name}_{args.backbone.removeprefix(DEFAULT_BACKBONE + '_')}"))
    command = "python bench/bench_answer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    jobs = [(f"answer-s{s}", s, "default") for s in args.seeds]
    jobs += [(f"answer-{v}-s{s}", s, v) for v, seeds in args.variant for s in seeds or args.seeds[:1]]
    answers, setting = {}, Setting.of(args)
    for name, seed, variant in jobs:
        best, wall = run_sweep(args.runs, name, seed, VARIANTS[variant] + setting.overrides(), args.backbone)
        if why := setting.mismatch(best["sampling"]["top_p"], best["sampling"]["schedule"]):
            raise RuntimeError(f"{name} {why}: give another --runs")
        answers[name] = (seed, variant, best, wall)
        print(f"{name}: {best['kind']} w={best['w_cfg']} w'={best['w_igg']} win={best['window']} "
              f"FID {best['fid']:.3f} ({wall:.0f} s)", flush=True)

    if args.earlier is not None:
        for path in sorted(args.earlier.glob("*/sweeps/*/best.yaml")):
            best = yaml.safe_load(path.read_text())
            if best["backbone"] != args.backbone:
                print(f"{path}: backbone {best['backbone']!r}, not {args.backbone!r}: left out", flush=True)
                continue
            answers[f"earlier {path.parent.name}"] = (best["sampling"]["seed"], "earlier settings", best, math.nan)
    grid_args = argparse.Namespace(ref_cache=None, reference=8000, n_broad=512, n_full=args.n, workers=2, threads=1,
                                   backbone=args.backbone, top_p=setting.top_p, schedule=setting.schedule)
    grid = Grid(args.cache, grid_args, command)  # samples args.backbone's checkpoints (refuses another's cache)
    for name, (_, variant, best, _) in answers.items():
        if (why := backbone_mismatch(args.backbone, best, grid.ckpts)) is None:
            continue
        if variant != "earlier settings":  # this run's own sweeps: never re-measured on other checkpoints
            grid.close()
            raise RuntimeError(f"{name}: {why}; give --backbone or another --runs")
        print(f"{name}: {why} (re-measured as is, with the earlier settings)", flush=True)
    named = None if args.grid_best is None else make_point(*[
        x if i == 0 else float(x) for i, x in enumerate(args.grid_best.split(":"))])
    try:
        if named is not None:
            grid.sample("grid best", [(named, s, args.n) for s in GRID_SEEDS])
            grid.set_stage("grid best", [named])  # a point of the grid's summary (answers stay out of it)
        grid.sample("answers", [(point_of(b), s, args.n) for _, _, b, _ in answers.values() for s in args.answer_seeds])
        summary = grid.summary()
    finally:
        grid.close()
    if "full" not in summary:
        raise RuntimeError(f"{args.cache} has no point at {args.n} images yet; run bench/bench_grid.py first")
    answer_keys = {point_of(b).key for _, _, b, _ in answers.values()}
    grid_points = [r for r in summary["full"] if Point(**r["point"]).key not in answer_keys]
    if named is not None:
        g = next(r for r in summary["full"] if Point(**r["point"]).key == named.key)
    else:
        g = summary.get("grid_best") or min(grid_points, key=lambda r: r["mean"])  # 3 seeds, else the first seed
    gp = Point(**g["point"])
    three = [Point(**r["point"]) for r in summary["full"] if r["seeds"] == len(GRID_SEEDS)]
    three += [p for p in dict.fromkeys(point_of(b) for _, _, b, _ in answers.values())  # answers with every seed
              if p not in three and all(grid.have(p, s) >= args.n for s in GRID_SEEDS)]
    noise_rows = noise_check(grid, three, args.n) if len(three) else ["| - | no three-seed points yet | |"]
    best_fid = {s: grid.fid(gp, s, args.n) for s in GRID_SEEDS}
    rows, ratios = [], []
    by_variant: dict[str, dict[int, tuple[float, int]]] = {}  # variant -> seed -> (ratio, images)
    for name, (seed, variant, b, wall) in answers.items():
        pt = point_of(b)
        fids = {s: grid.fid(pt, s, args.n) for s in args.answer_seeds}
        ratio = statistics.mean(fids[s] / best_fid[s] for s in args.answer_seeds)
        worst = max(fids[s] / best_fid[s] for s in args.answer_seeds)
        if variant == "default":
            ratios.append(ratio)
        c = b["cost"]["total"]
        by_variant.setdefault(variant, {})[seed] = (ratio, c["images"])
        held = " hold-out" if b.get("holdout_from") is not None else ""  # best.yaml before confirm.holdout: none
        rows.append(f"| {name} | {variant} | {seed} | {pt.label()} | {b['fid']:.2f} [{b['fid_low']:.2f}, "
                    f"{b['fid_high']:.2f}] at {b['num_images']}{held} | {statistics.mean(fids.values()):.3f} | "
                    f"{ratio:.3f} | {worst:.3f} | "
                    f"{c['images']} | {c['worker_s']:.0f} | {f'{wall / 60:.1f}' if math.isfinite(wall) else '-'} | "
                    f"{rho_cell(b)} |")
    variant_lines = []
    for variant, runs in by_variant.items():
        if variant in ("default", "earlier settings"):
            continue
        paired = {s: by_variant.get("default", {}).get(s) for s in runs}
        variant_lines.append(
            f"- {variant} (seeds {', '.join(map(str, runs))}): answer ÷ grid best "
            f"{', '.join(f'{r:.3f}' for r, _ in runs.values())}, images {', '.join(str(i) for _, i in runs.values())}"
            + ("; the default sweep at the same seeds: " + ", ".join(f"{d[0]:.3f} ({d[1]} images)"
                                                                  for d in paired.values())
               if all(paired.values()) else "") + ".")
    kinds_1d, mixed_2d = 2, len(BASELINE_WEIGHTS)
    baseline_1d = kinds_1d * len(BASELINE_WEIGHTS) * BASELINE_N + BASELINE_BEST_N
    baseline_all = (kinds_1d * len(BASELINE_WEIGHTS) + mixed_2d ** 2) * BASELINE_N + BASELINE_BEST_N
    sweep_images = statistics.mean(a[2]["cost"]["total"]["images"] for a in answers.values() if a[1] == "default")
    three_seeds = "grid_best" in summary
    grid_desc = f"{'3 seeds' if three_seeds else f'seed {GRID_SEEDS[0]} only'} x {args.n} images"
    grid_spread = f" ± {g['std']:.3f}" if three_seeds else ""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work while it ran: wall times are "
        f"upper bounds), load average {os.getloadavg()[0]:.1f} at the end; {date}.",
        "",
        f"Grid best (bench_grid.py, {grid_desc}): **{g['label']}**, FID {g['mean']:.3f}{grid_spread} (per seed "
        f"{', '.join(f'{s}: {v:.3f}' for s, v in best_fid.items())}). "
        f"Each answer is re-measured the same way at seed(s) {args.answer_seeds} (same labels "
        "and reference), and divided by the grid best's FID at the same seed (the two share their seeds, which on "
        "this backbone shrinks the noise of a difference little; see Reference grid); \"worst seed\" is the largest "
        "per-seed ratio. The sweep's own FID is against its own reference (confirm.reference_num_images real images, "
        "the sweep seed), at its N (hold-out: on the images the race's last rung added, confirm.holdout). Wall "
        "minutes: the run that finished the sweep (a finished sweep is read, not rerun).",
        "",
        "| sweep | variant | seed | answer | sweep's FID [95 %] | re-measured FID | ÷ grid best | worst seed "
        "| images | worker s | wall min | ρ(gap, FID) [95 %] |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Default sweeps: answer ÷ grid best {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} seeds "
        f"(target <= 1.03)."
        + (f" The grid best's own FID has a std of {g['std']:.3f} ({g['std'] / g['mean']:.1%}) between seeds, so a "
           "ratio a few percent either side of 1 is inside the noise of this re-measurement." if three_seeds else ""),
        "",
        *([*variant_lines, ""] if variant_lines else []),
        *stage_costs([a[2] for a in answers.values() if a[1] == "default"]),
        "",
        f"Cost baseline, a RandAR-style grid scaled to this backbone (w from 2 to 8 in steps of 0.5 at "
        f"{BASELINE_N} images per point, the best rerun at {BASELINE_BEST_N}): CFG and IGG alone "
        f"{baseline_1d:,} images; with mixed guidance on the same 13 x 13 grid {baseline_all:,} images. The default "
        f"sweep samples {sweep_images:,.0f} images on average: {sweep_images / baseline_1d:.1%} of the 1-D grids, "
        f"{sweep_images / baseline_all:.1%} of all three kinds. The grid's answer can be no better than the grid "
        f"best above; where that lies outside 2..8 the baseline misses it.",
        "",
        f"Noise model: the sweep's interval is FID ± 1.96 x the bootstrap std over images. Over the "
        f"{len(three)} three-seed points of this run, the relative std of FID between the {len(GRID_SEEDS)} seeds, "
        f"between disjoint blocks of N of their {args.n} images, and the bootstrap's over all images and inside "
        "each class (`confirm.stratify`, the default), mean over points and seeds, at each N:",
        "",
        "| N | std over seeds | std over blocks | bootstrap std, all images | bootstrap std, inside classes |",
        "|---:|---:|---:|---:|---:|",
        *noise_rows,
    ])
    publish(body, section_name(SECTION, args.backbone, setting), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
