"""Reference FID grid on an embedded backbone (issues #13, #23): where is the optimum of CFG, IGG and mixed guidance?

Every point samples labels ``i % 8`` in batches of 64, batch b with ``seed=derive_seed(seed, b)`` (the sweep's own
FID sampling), so the first N images of a point are a prefix of any larger N at the same seed: features are cached
per point and seed (``<cache>/features/*.npy``) and extended, never resampled. FID is torch-fidelity's, in the
shipped classifier's feature space (``guidetune-tiny``), against real images of the procedural generator drawn
with a seed the sweep never uses; the grid's sampler seeds (1000+) and the reference seed differ from the sweep's.

Stages (all run in order; each resumes from the cache, so a rerun only samples what is missing):

1. broad scan at ``--n-broad`` images, seed 1000: CFG, IGG global, IGG window 3 over weights up to
   ``--max-weight`` (default 20), mixed (global IGG) on a 2-D grid, the unguided conditional sampler (w_cfg=0) and
   the backbone default CFG; then midpoints around each kind's best where its grid neighbours are far apart (or one
   step beyond the grid edge, never past the sweep's ``search.max_weight``);
2. refine: the best ``--refine`` points of stage 1 plus the best 2 of each kind extended to ``--n-full`` images;
3. proxy signals (the sweep's default trial: 32 images, seeds 0..2) of every other stage-1 point (the rest
   after stage 4), Spearman rho of the gap |vocab_evenness - div_uncond| (natural units) and of each signal with
   the stage-1 FID;
4. the best ``--confirm`` points of stage 2 plus the best of each kind, two more seeds at ``--n-full`` images
   (best first): the grid best is the lowest mean FID over the three seeds;
5. FID noise at each rung N (prefixes of those points' features): std over seeds, std over disjoint blocks of N
   images, and the std of the FID difference of the two best points on common vs independent random numbers.

Above 20 the weights are spaced roughly uniformly in log(1 + w), the scale on which FID changes at the top:
``--max-weight 30`` adds 25 and 30 to the 1-D scans (steps of 0.15-0.21 in log(1 + w) from 14 up), and 16 to the
mixed grid's CFG axis and 24 to its IGG axis (the axes' steps of about 0.6 and 0.3-0.4 in log(1 + w) continued;
the mixed grid is 2-D and costly, so one value per axis). ``--backbone NAME`` samples conf/backbone/NAME.yaml's
checkpoints; the FID extractor and the reference stay the shipped classifier and the procedural shapes (both
embedded backbones are trained on them). ``--kinds`` picks the kinds sampled (default all).

    nice -n 19 python bench/bench_grid.py                 # results in /work/gridcache (grid.json, grid.md)
    python bench/bench_grid.py --write                    # also docs/BENCHMARKS.md "## Reference grid"
    python bench/bench_grid.py --report --write           # only report what the cache holds (a run cut short)
    nice -n 19 python bench/bench_grid.py --backbone tiny_small --max-weight 30 --kinds cfg "igg global" \
        "mixed global" --cache /work/gridcache_small      # --write: "## Reference grid (tiny_small)"
    ... --top-p 0.8 --cache /work/gridcache_small_p08     # "## Reference grid (tiny_small, top_p=0.8)"
    ... --schedule constant --cache /work/gridcache_small_const  # "... (tiny_small, schedule=constant)"
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from benchdoc import provenance, publish
from scipy.stats import spearmanr

from pipeline.config.schema import SearchConfig, load_config
from pipeline.core.guidance import INTERVAL_SCHEDULES, SCHEDULES
from pipeline.data.files import atomic_write

SECTION = "Reference grid"        # the default backbone's; another's is "Reference grid (NAME)"
DEFAULT_BACKBONE = "tiny"
DEFAULT_CACHE = Path("/work/gridcache")   # the default backbone's; see default_cache
BATCH = 64                       # images per sampler call; also the FID extractor's batch
NUM_CLASSES = 8
REF_SEED = 7919                  # reference images: a seed the sweep never uses (it uses 0, 1, 2, ...)
GRID_SEEDS = (1000, 1001, 1002)  # sampler seeds of the grid, never used by the sweep
PROXY_SEEDS = (0, 1, 2)          # the sweep's own proxy-trial seeds
PROXY_IMAGES = 32
DEFAULT_CFG = 1.5                # the backbone's published CFG weight (pipeline.config.schema default_cfg)
SIGNALS = ("token_evenness", "vocab_evenness", "div_uncond", "div_cond")
KINDS = ("cfg", "igg global", "igg window 3", "mixed global")
WEIGHTS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 17, 20)
WINDOW_WEIGHTS = (3, 5, 8, 12, 16, 20)
MIXED_CFG = (1, 2, 4, 8)
MIXED_IGG = (4, 8, 12, 16)
HIGH_WEIGHTS = (25, 30)          # the 1-D scans above 20, up to --max-weight (roughly uniform in log(1 + w))
HIGH_MIXED = 24                  # --max-weight from which the mixed axes grow by one value each:
MIXED_CFG_HIGH, MIXED_IGG_HIGH = 16, 24
DEFAULT_MAX_WEIGHT = 20.0
SEARCH_MAX_WEIGHT = SearchConfig().max_weight   # the sweep's default cap (30): stage 1b never passes it
RUNGS = (256, 512, 1024, 2048, 4096)


def backbone_checkpoints(name: str) -> dict[str, str]:
    """vae_ckpt and var_ckpt of the composed conf/backbone/NAME.yaml (backbones extend one another)."""
    conf = load_config([f"backbone={name}"]).backbone
    return {"vae_ckpt": str(conf.vae_ckpt), "var_ckpt": str(conf.var_ckpt)}


def default_cache(backbone: str) -> Path:
    """The results folder of a backbone's grid: /work/gridcache for tiny, /work/gridcache_small for tiny_small,
    /work/gridcache_NAME for any other."""
    if backbone == DEFAULT_BACKBONE:
        return DEFAULT_CACHE
    return DEFAULT_CACHE.with_name(f"gridcache_{backbone.removeprefix(DEFAULT_BACKBONE + '_')}")


@dataclass(frozen=True)
class Setting:
    """The sampling setting of a grid and of the sweeps measured against it: nucleus sampling and the guidance
    schedule (the embedded backbones' defaults: no top-p, linear ramp). Another setting moves the optimum, so its
    grid and sweeps are measured apart (their own --cache and --runs)."""

    top_p: float = 0.0
    schedule: str = "linear"

    def changed(self) -> dict[str, float | str]:
        """The fields that differ from the defaults."""
        return {k: v for k, v in asdict(self).items() if v != getattr(Setting, k)}

    def tags(self) -> list[str]:
        """The non-default values as they name a docs section: ``top_p=0.8``, ``schedule=constant``."""
        return [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.changed().items()]

    def overrides(self) -> list[str]:
        """The sweep's Hydra overrides that sample so (none for a default value)."""
        keys = {"top_p": "backbone.top_p", "schedule": "guidance.schedule"}
        return [f"{keys[k]}={v}" for k, v in self.changed().items()]

    def mismatch(self, top_p: float, schedule: str) -> str | None:
        """Why a sweep sampled with (top_p, schedule) is not of this setting, or None."""
        other = Setting(top_p, schedule)
        return None if other == self else f"sampled with {', '.join(other.tags()) or 'the defaults'}, not " \
                                          f"{', '.join(self.tags()) or 'the defaults'}"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--top-p", type=float, default=Setting.top_p,
                       help=f"nucleus sampling of {what} (0: none, the backbone's default): a sampling setting that "
                            "moves the optimum")
        p.add_argument("--schedule", choices=[x for x in SCHEDULES if x not in INTERVAL_SCHEDULES],
                       default=Setting.schedule, help=f"guidance schedule of {what} (linear: the default ramp; "
                       "constant: the full weight at every scale; an interval would need its scales, so none is "
                       "offered)")

    @staticmethod
    def of(args: argparse.Namespace) -> Setting:
        return Setting(getattr(args, "top_p", Setting.top_p), getattr(args, "schedule", Setting.schedule))


def section_name(section: str, backbone: str, setting: Setting) -> str:
    """docs/BENCHMARKS.md's section of a backbone and sampling setting: SECTION for tiny at the defaults, else
    "SECTION (NAME)" or "SECTION (NAME, top_p=P, schedule=S)"."""
    tags = ([] if backbone == DEFAULT_BACKBONE and setting == Setting() else [backbone]) + setting.tags()
    return f"{section} ({', '.join(tags)})" if tags else section


# ------------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class Point:
    kind: str
    w_cfg: float | None
    w_igg: float | None
    window: int | None = None

    @property
    def key(self) -> str:
        def f(x: float | None) -> str:
            return "none" if x is None else f"{x:g}"
        return f"{self.kind.replace(' ', '-')}_c{f(self.w_cfg)}_i{f(self.w_igg)}_win{f(self.window)}"

    def label(self) -> str:
        if self.kind == "cfg":
            return f"CFG w={self.w_cfg:g}"
        if self.kind.startswith("igg"):
            return f"IGG w'={self.w_igg:g}" + ("" if self.window is None else f" (window {self.window})")
        return f"mixed w={self.w_cfg:g}, w'={self.w_igg:g}"

    def max_weight(self) -> float:
        return max(w for w in (self.w_cfg, self.w_igg) if w is not None)


def make_point(kind: str, a: float, b: float | None = None) -> Point:
    """A point of `kind`: weight a (CFG or IGG), or (a, b) = (w, w') for mixed."""
    if kind == "cfg":
        return Point(kind, float(a), None)
    if kind == "igg global":
        return Point(kind, None, float(a))
    if kind == "igg window 3":
        return Point(kind, None, float(a), 3)
    return Point(kind, float(a), float(b))


def broad_points(max_weight: float = DEFAULT_MAX_WEIGHT, kinds: tuple[str, ...] = KINDS) -> list[Point]:
    """Stage 1: the 1-D scans first (cheap to read when the run is cut short), then the mixed 2-D grid; weights up
    to `max_weight` (see the module docstring), only the `kinds` named."""
    def upto(ws: tuple[float, ...]) -> list[float]:
        return [w for w in (*ws, *HIGH_WEIGHTS) if w <= max_weight]
    high = max_weight >= HIGH_MIXED
    mixed_cfg = [w for w in (*MIXED_CFG, *([MIXED_CFG_HIGH] if high else [])) if w <= max_weight]
    mixed_igg = [w for w in (*MIXED_IGG, *([MIXED_IGG_HIGH] if high else [])) if w <= max_weight]
    out = [make_point("cfg", w) for w in (0, 1, DEFAULT_CFG, *upto(WEIGHTS[1:]))]
    out += [make_point("igg global", w) for w in upto(WEIGHTS)]
    out += [make_point("igg window 3", w) for w in upto(WINDOW_WEIGHTS)]
    out += [make_point("mixed global", w, v) for w in mixed_cfg for v in mixed_igg]
    return [p for p in dict.fromkeys(out) if p.kind in kinds]


def _around(w: float, axis: list[float], cap: float = math.inf) -> list[float]:
    """Midpoints between w and its grid neighbours on `axis` when they are more than 3.5 apart (closer ones are
    within the broad scan's FID noise); one step past the top of the grid when w is its largest value, unless
    that passes `cap` (the sweep's search.max_weight: it never answers a larger weight)."""
    axis = sorted(set(axis))
    i = axis.index(w)
    out = []
    if i + 1 < len(axis) and axis[i + 1] - w > 3.5:
        out.append(round(w + axis[i + 1]) / 2)
    if i > 0 and w - axis[i - 1] > 3.5:
        out.append(round(w + axis[i - 1]) / 2)
    if i == len(axis) - 1 and round(w * 1.25) <= cap:
        out.append(round(w * 1.25))
    return out


def neighbour_points(fids: dict[Point, float], cap: float = math.inf) -> list[Point]:
    """Stage 1b: midpoints around the best point of each kind (see :func:`_around`), none past `cap`."""
    out = []
    for kind in KINDS:
        mine = {p: v for p, v in fids.items() if p.kind == kind}
        if not mine:
            continue
        best = min(mine, key=mine.get)
        if kind == "mixed global":
            cfg_axis = [p.w_cfg for p in mine if p.w_igg == best.w_igg]
            igg_axis = [p.w_igg for p in mine if p.w_cfg == best.w_cfg]
            out += [make_point(kind, w, best.w_igg) for w in _around(best.w_cfg, cfg_axis, cap)]
            out += [make_point(kind, best.w_cfg, v) for v in _around(best.w_igg, igg_axis, cap)]
        else:
            w = best.w_cfg if kind == "cfg" else best.w_igg
            axis = [p.w_cfg if kind == "cfg" else p.w_igg for p in mine]
            out += [make_point(kind, v) for v in _around(w, axis, cap)]
    return [p for p in dict.fromkeys(out) if p not in fids]


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def ranked(fids: dict[Point, float]) -> list[Point]:
    return sorted(fids, key=lambda p: (fids[p], p.key))


def best_of_kinds(fids: dict[Point, float], per_kind: int) -> list[Point]:
    order = ranked(fids)
    return [p for kind in KINDS for p in [q for q in order if q.kind == kind][:per_kind]]


# ------------------------------------------------------------------------------------------------ workers

_W: dict = {}


def _init_worker(threads: int, vae: str | None = None, var: str | None = None, setting: Setting = Setting()) -> None:
    """A pool worker's backbone (the embedded one unless `vae` and `var` name other checkpoints), its sampling
    setting and the extractor."""
    torch.set_num_threads(threads)
    _W["setting"] = setting
    from pipeline.backbones.tiny import TINY_VAE, TINY_VAR
    from pipeline.backbones.var import load_var
    from pipeline.fid.fidelity import TINY_EXTRACTOR, FidEvaluator
    _W["backbone"] = load_var(vae or TINY_VAE, var or TINY_VAR)
    _W["evaluator"] = FidEvaluator(TINY_EXTRACTOR, metrics=["fid"], batch_size=BATCH, progress=False)


def feature_path(cache: Path, p: Point, seed: int) -> Path:
    return cache / "features" / f"{p.key}_s{seed}.npy"


def load_features(cache: Path, p: Point, seed: int) -> np.ndarray | None:
    path = feature_path(cache, p, seed)
    return np.load(path) if path.is_file() else None


def load_walls(cache: Path, p: Point, seed: int) -> dict[int, float]:
    """Cumulative sampling + feature seconds of a point's features at each stored image count."""
    path = feature_path(cache, p, seed).with_suffix(".json")
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def sample_task(args: tuple[str, Point, int, int]) -> tuple[Point, int, int, float]:
    """Extend the cached features of (point, seed) to n images; returns (point, seed, n, seconds spent)."""
    from pipeline.core.sampling import sample
    from pipeline.core.seeds import derive_seed
    cache, p, seed, n = Path(args[0]), args[1], args[2], args[3]
    have = load_features(cache, p, seed)
    have = np.zeros((0, 0), np.float32) if have is None else have
    start = time.perf_counter()
    evaluator, parts = _W["evaluator"], [have] if len(have) else []
    for b in range(len(have) // BATCH, n // BATCH):
        labels = torch.arange(b * BATCH, (b + 1) * BATCH) % NUM_CLASSES
        images = sample(_W["backbone"], labels, w_cfg=p.w_cfg, w_igg=p.w_igg, window=p.window,
                        top_p=_W["setting"].top_p, schedule=_W["setting"].schedule,
                        seed=derive_seed(seed, b), with_signals=False).images
        parts.append(evaluator.features([images])[evaluator.feature_layer].numpy())
    features = np.concatenate(parts).astype(np.float32)
    spent = time.perf_counter() - start
    walls = load_walls(cache, p, seed)
    walls[len(features)] = max(walls.values(), default=0.0) + spent
    path = feature_path(cache, p, seed)
    atomic_write(path, lambda f: np.save(f, features))
    atomic_write(path.with_suffix(".json"), json.dumps(walls).encode())
    return p, seed, len(features), spent


def proxy_task(p_seed: tuple[Point, int]) -> tuple[Point, int, dict[str, float]]:
    """The sweep's default proxy trial: 32 images, one batch, seed derive_seed(seed, 0), trial-level signals."""
    from pipeline.core.metrics import trial_mean
    from pipeline.core.sampling import sample
    from pipeline.core.seeds import derive_seed
    p, seed = p_seed
    labels = torch.arange(PROXY_IMAGES) % NUM_CLASSES
    result = sample(_W["backbone"], labels, w_cfg=p.w_cfg, w_igg=p.w_igg, window=p.window,
                    top_p=_W["setting"].top_p, schedule=_W["setting"].schedule,
                    seed=derive_seed(seed, 0), with_signals=True)
    return p, seed, {name: float(trial_mean([getattr(s, name) for s in result.signals]).mean())
                     for name in SIGNALS}


# ------------------------------------------------------------------------------------------------ the grid


class Grid:
    """Cached results: feature files per (point, seed), FID from their prefixes, proxy signals, one JSON."""

    def __init__(self, cache: Path, args: argparse.Namespace, command: str):
        from pipeline.fid.fidelity import TINY_EXTRACTOR, FidEvaluator, shapes_source
        self.cache, self.args, self.command = cache, args, command
        self.backbone = getattr(args, "backbone", DEFAULT_BACKBONE)
        self.ckpts = backbone_checkpoints(self.backbone)
        self.json_path = cache / "grid.json"
        stored = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}
        was = stored.get("setup", {}).get("backbone_name", DEFAULT_BACKBONE) if stored else self.backbone
        if was != self.backbone:
            raise SystemExit(f"{cache} holds the grid of backbone {was!r}, not {self.backbone!r}: give --cache")
        self.setting = Setting.of(args)
        setup = stored.get("setup", {})
        if stored and (why := self.setting.mismatch(setup.get("top_p", Setting.top_p),
                                                    setup.get("schedule", Setting.schedule))):
            raise SystemExit(f"{cache} holds a grid {why}: give --cache")
        self.proxy: dict[str, dict[str, dict[str, float]]] = stored.get("proxy", {})
        self.stages: dict[str, list[str]] = stored.get("stages", {})
        self.points: dict[str, Point] = {k: Point(**v) for k, v in stored.get("point_defs", {}).items()}
        self.runs: list[dict] = stored.get("runs", [])
        self.run = {"command": command, "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "sampled_images": 0}
        self.runs.append(self.run)
        self.t0 = time.monotonic()
        self.evaluator = FidEvaluator(TINY_EXTRACTOR, metrics=["fid"], batch_size=BATCH, progress=False,
                                      cache_dir=args.ref_cache or cache / "reference")
        t = time.monotonic()
        self.reference = self.evaluator.reference(shapes_source(args.reference, REF_SEED, BATCH))
        print(f"reference: {args.reference} real images, seed {REF_SEED} "
              f"({'cached' if self.reference.from_cache else f'{time.monotonic() - t:.0f} s'})", flush=True)
        self._fid: dict[tuple[str, int, int], float] = {}
        self._features: dict[tuple[str, int], np.ndarray] = {}
        self.pool = None

    # ---------------------------------------------------------------------------------------- access

    def features(self, p: Point, seed: int) -> np.ndarray | None:
        got = self._features.get((p.key, seed))
        if got is None:
            got = load_features(self.cache, p, seed)
            if got is not None:
                self._features[(p.key, seed)] = got
        return got

    def have(self, p: Point, seed: int) -> int:
        f = self.features(p, seed)
        return 0 if f is None else len(f)

    def fid(self, p: Point, seed: int, n: int, start: int = 0) -> float | None:
        """FID of images start..start+n of (point, seed); None when they are not sampled yet."""
        key = (p.key, seed, n) if start == 0 else (p.key, seed, n, start)
        if key not in self._fid:
            f = self.features(p, seed)
            if f is None or len(f) < start + n:
                return None
            layer = self.evaluator.feature_layer
            self._fid[key] = float(self.evaluator.metrics_of({layer: torch.from_numpy(f[start:start + n])},
                                                             self.reference)["fid"])
        return self._fid[key]

    def fids(self, points: list[Point], seed: int, n: int) -> dict[Point, float]:
        return {p: v for p in points if (v := self.fid(p, seed, n)) is not None}

    def stage_points(self, name: str) -> list[Point]:
        return [self.points[k] for k in self.stages.get(name, [])]

    def set_stage(self, name: str, points: list[Point]) -> None:
        for p in points:
            self.points[p.key] = p
        self.stages[name] = [p.key for p in points]
        self.save()

    # ---------------------------------------------------------------------------------------- running

    def _pool(self) -> mp.pool.Pool:
        if self.pool is None:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            ctx = mp.get_context("spawn")
            self.pool = ctx.Pool(self.args.workers, initializer=_init_worker, initargs=(
                self.args.threads, self.ckpts["vae_ckpt"], self.ckpts["var_ckpt"], self.setting))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def sample(self, stage: str, jobs: list[tuple[Point, int, int]]) -> None:
        """Extend every (point, seed) of `jobs` to n images (only the missing batches), saving after each."""
        before = {(p.key, s): self.have(p, s) for p, s, _ in jobs}
        todo = [(p, s, n) for p, s, n in jobs if before[(p.key, s)] < n]
        images = sum(n - before[(p.key, s)] for p, s, n in todo)
        print(f"[{stage}] {len(jobs)} point-seeds, {len(todo)} to sample ({images} images)", flush=True)
        if not todo:
            return
        t, done_images = time.monotonic(), 0
        tasks = [(str(self.cache), p, s, n) for p, s, n in todo]
        for i, (p, s, n, spent) in enumerate(self._pool().imap_unordered(sample_task, tasks), 1):
            added = n - before[(p.key, s)]
            self._features.pop((p.key, s), None)
            done_images += added
            self.run["sampled_images"] += added
            rate = done_images / (time.monotonic() - t)
            print(f"[{stage}] {i}/{len(todo)} {p.label():28s} seed {s} N={n}: FID {self.fid(p, s, n):7.3f} "
                  f"({spent:.0f} s; {rate:.1f} img/s, ~{(images - done_images) / rate / 60:.0f} min left; "
                  f"{(time.monotonic() - self.t0) / 60:.0f} min in)", flush=True)
            self.save()

    def measure_proxy(self, points: list[Point]) -> None:
        todo = [(p, s) for p in points for s in PROXY_SEEDS if str(s) not in self.proxy.get(p.key, {})]
        print(f"[proxy] {len(todo)} trials of {PROXY_IMAGES} images", flush=True)
        for i, (p, s, signals) in enumerate(self._pool().imap_unordered(proxy_task, todo, chunksize=3), 1):
            self.points[p.key] = p
            self.proxy.setdefault(p.key, {})[str(s)] = signals
            if i % 30 == 0 or i == len(todo):
                print(f"[proxy] {i}/{len(todo)}", flush=True)
                self.save()

    # ---------------------------------------------------------------------------------------- output

    def rows(self) -> list[dict]:
        """Every measured (point, seed, N) for N in the rungs that were sampled."""
        out = []
        for p in sorted(self.points.values(), key=lambda q: q.key):
            for seed in GRID_SEEDS:
                rows = self.have(p, seed)
                if rows == 0:
                    continue
                walls = load_walls(self.cache, p, seed)
                for n in sorted(n for n in {*walls, self.args.n_broad, self.args.n_full} if n <= rows):
                    # a prefix that was never a stopping point: its share of the next stored count's seconds
                    m = n if n in walls else min(k for k in walls if k > n)
                    out.append({**asdict(p), "seed": seed, "N": n, "fid": self.fid(p, seed, n),
                                "wall_s": round(walls[m] * n / m, 1), "wall_prorated": m != n})
        return out

    def save(self) -> None:
        self.run["minutes"] = round((time.monotonic() - self.t0) / 60, 1)
        blob = {
            "setup": {"backbone": f"embedded {self.backbone} VAR (pipeline/backbones/weights)",
                      "backbone_name": self.backbone, **self.ckpts, "extractor": "guidetune-tiny",
                      "reference": {"num_images": self.args.reference, "seed": REF_SEED},
                      "batch": BATCH, "labels": "i % 8", "sampler_seed": "derive_seed(seed, batch index)",
                      "schedule": self.setting.schedule, "top_k": 0, "top_p": self.setting.top_p,
                      "grid_seeds": list(GRID_SEEDS),
                      "n_broad": self.args.n_broad, "n_full": self.args.n_full,
                      "max_weight": getattr(self.args, "max_weight", DEFAULT_MAX_WEIGHT),
                      "kinds": list(getattr(self.args, "kinds", KINDS)),
                      "proxy": {"num_images": PROXY_IMAGES, "seeds": list(PROXY_SEEDS)}},
            "points": self.rows(),
            "proxy": self.proxy,
            "summary": self.summary(),
            "stages": self.stages,
            "point_defs": {k: asdict(p) for k, p in self.points.items()},
            "runs": self.runs,
        }
        atomic_write(self.json_path, (json.dumps(blob, indent=1) + "\n").encode())

    def seed_stats(self, p: Point, n: int) -> tuple[float, float, int] | None:
        values = [v for s in GRID_SEEDS if (v := self.fid(p, s, n)) is not None]
        if not values:
            return None
        return statistics.mean(values), _std(values), len(values)

    def summary(self) -> dict:
        a, out = self.args, {}
        broad = self.fids(self.stage_points("1") + self.stage_points("1b"), GRID_SEEDS[0], a.n_broad)
        if broad:
            out["broad_best"] = {p.kind: {"point": asdict(p), "label": p.label(), "fid": broad[p]}
                                 for p in best_of_kinds(broad, 1)}
        full = [p for p in self.points.values() if self.have(p, GRID_SEEDS[0]) >= a.n_full]
        stats = {p: st for p in full if (st := self.seed_stats(p, a.n_full)) is not None}
        three = {p: st for p, st in stats.items() if st[2] == len(GRID_SEEDS)}
        if stats:
            out["full"] = [{"point": asdict(p), "label": p.label(), "mean": st[0], "std": st[1], "seeds": st[2]}
                           for p, st in sorted(stats.items(), key=lambda kv: kv[1][0])]
        if three:
            best = min(three, key=lambda p: three[p][0])
            out["grid_best"] = {"point": asdict(best), "label": best.label(), "mean": three[best][0],
                                "std": three[best][1], "N": a.n_full}
            out["best_per_kind"] = {p.kind: {"point": asdict(p), "label": p.label(), "mean": three[p][0],
                                             "std": three[p][1]}
                                    for p in best_of_kinds({q: st[0] for q, st in three.items()}, 1)}
            out["noise"] = self.noise(sorted(three, key=lambda p: three[p][0]))
        out["rho"] = self.rho(broad)
        return out

    def noise(self, points: list[Point]) -> dict:
        """FID noise at each rung from the 3-seed points: std over seeds, over disjoint blocks, and of differences."""
        rungs = [n for n in RUNGS if n <= self.args.n_full]
        per_rung = []
        for n in rungs:
            seeds_rel, blocks_rel, rows = [], [], {}
            for p in points:
                values = [self.fid(p, s, n) for s in GRID_SEEDS]
                blocks = [self.fid(p, s, n, start) for s in GRID_SEEDS
                          for start in range(0, self.args.n_full - n + 1, n)]
                m, sd = statistics.mean(values), _std(values)
                bm, bsd = statistics.mean(blocks), _std(blocks)
                seeds_rel.append(sd / m)
                blocks_rel.append(bsd / bm)
                rows[p.key] = {"mean": m, "std_seeds": sd, "block_mean": bm, "std_blocks": bsd, "blocks": len(blocks)}
            entry = {"N": n, "points": rows, "rel_std_seeds_mean": statistics.mean(seeds_rel),
                     "rel_std_blocks_mean": statistics.mean(blocks_rel)}
            if len(points) >= 2:
                entry["difference"] = self.difference(points[0], points[1], n)
            per_rung.append(entry)
        return {"points": [p.key for p in points], "rungs": per_rung}

    def difference(self, a: Point, b: Point, n: int) -> dict:
        """FID(a) - FID(b) on the same images seeds and batches (common random numbers) vs on different ones."""
        blocks = [(s, start) for s in GRID_SEEDS for start in range(0, self.args.n_full - n + 1, n)]
        common = [self.fid(a, s, n, st) - self.fid(b, s, n, st) for s, st in blocks]
        shifted = blocks[1:] + blocks[:1]
        independent = [self.fid(a, s, n, st) - self.fid(b, s2, n, st2)
                       for (s, st), (s2, st2) in zip(blocks, shifted, strict=True)]
        return {"a": a.key, "b": b.key, "pairs": len(blocks), "mean_common": statistics.mean(common),
                "std_common": _std(common), "std_independent": _std(independent)}

    def rho(self, broad: dict[Point, float]) -> dict:
        """Spearman rho with the stage-1 FID of the gap |vocab_evenness - div_uncond| and of each signal."""
        pts = [p for p in broad if len(self.proxy.get(p.key, {})) == len(PROXY_SEEDS)]

        def signal(p: Point, name: str) -> float:
            return statistics.mean(v[name] for v in self.proxy[p.key].values())

        def gap(p: Point) -> float:
            return abs(signal(p, "vocab_evenness") - signal(p, "div_uncond"))

        subsets = {"all": pts, "max weight <= 6": [p for p in pts if p.max_weight() <= 6],
                   "max weight > 6": [p for p in pts if p.max_weight() > 6],
                   **{kind: [p for p in pts if p.kind == kind] for kind in KINDS}}
        out = {}
        for name, sub in subsets.items():
            if len(sub) < 4:
                continue
            fid = [broad[p] for p in sub]
            out[name] = {"n": len(sub), "gap": float(spearmanr([gap(p) for p in sub], fid).statistic),
                         **{s: float(spearmanr([signal(p, s) for p in sub], fid).statistic) for s in SIGNALS}}
        return out

    def markdown(self) -> str:
        a, s = self.args, self.summary()
        minutes = sum(r.get("minutes", 0) for r in self.runs)
        lines = [f"Command: `{self.command}` ({minutes:.0f} min over {len(self.runs)} invocation(s), "
                 f"{a.workers} worker(s) x {a.threads} thread(s) on this machine's CPU, niced).", "",
                 f"Embedded backbone `{self.backbone}` ({provenance(self.ckpts['var_ckpt'])}), labels i % 8, "
                 f"batches of {BATCH} seeded `derive_seed(seed, b)`, {self.setting.schedule} schedule, "
                 f"top_k=0, top_p={self.setting.top_p:g}. FID in the shipped classifier's space (`guidetune-tiny`) "
                 f"against {a.reference} "
                 f"real images (seed {REF_SEED}); sampler seeds {', '.join(map(str, GRID_SEEDS))} (the sweep uses "
                 f"0, 1, 2, ...). Results: `{self.json_path}`.", ""]
        if "best_per_kind" in s:
            lines += [f"Best of each kind at N={a.n_full}, mean ± std over {len(GRID_SEEDS)} seeds:", "",
                      "| kind | point | FID |", "| --- | --- | ---: |"]
            lines += [f"| {k} | {v['label']} | {v['mean']:.3f} ± {v['std']:.3f} |"
                      for k, v in s["best_per_kind"].items()]
            g = s["grid_best"]
            lines += ["", f"Grid best: **{g['label']}**, FID {g['mean']:.3f} ± {g['std']:.3f} (the lowest mean over "
                      f"the points with {len(GRID_SEEDS)} seeds).", ""]
            short = [p for p in self.stage_points("3") if (st := self.seed_stats(p, a.n_full)) and
                     st[2] < len(GRID_SEEDS)]
            if short:
                seed0, best0 = GRID_SEEDS[0], self.fid(Point(**g["point"]), GRID_SEEDS[0], a.n_full)
                at0 = ", ".join(f"{p.label()} {self.fid(p, seed0, a.n_full):.3f}" for p in short)
                lines += [f"Stage 3 is incomplete: {len(short)} of its points have fewer than {len(GRID_SEEDS)} "
                          f"seeds (rerunning the command resumes it); at seed {seed0} they score {at0}, the grid "
                          f"best {best0:.3f}.", ""]
        if "full" in s:
            lines += [f"Refined points at N={a.n_full} (seed {GRID_SEEDS[0]}; mean ± std where 3 seeds):", "",
                      "| point | seeds | FID |", "| --- | ---: | ---: |"]
            lines += [f"| {r['label']} | {r['seeds']} | {r['mean']:.3f}"
                      + (f" ± {r['std']:.3f}" if r["seeds"] > 1 else "") + " |" for r in s["full"]]
            lines.append("")
        broad = self.fids(self.stage_points("1") + self.stage_points("1b"), GRID_SEEDS[0], a.n_broad)
        if broad:
            lines += [f"Broad scan at N={a.n_broad}, seed {GRID_SEEDS[0]} (FID):", ""]
            for kind in KINDS[:3]:
                mine = sorted((p for p in broad if p.kind == kind), key=lambda p: p.max_weight())
                if mine:
                    lines += [f"- {kind}: " + ", ".join(f"{p.max_weight():g}: {broad[p]:.2f}" for p in mine)]
            mixed = {(p.w_cfg, p.w_igg): v for p, v in broad.items() if p.kind == "mixed global"}
            if mixed:
                ws, vs = sorted({k[0] for k in mixed}), sorted({k[1] for k in mixed})
                lines += ["", "Mixed (global IGG), rows w, columns w':", "",
                          "| w \\ w' | " + " | ".join(f"{v:g}" for v in vs) + " |",
                          "| --- |" + " ---: |" * len(vs)]
                lines += [f"| {w:g} | " + " | ".join(f"{mixed[(w, v)]:.2f}" if (w, v) in mixed else ""
                                                     for v in vs) + " |" for w in ws]
            lines.append("")
        if "noise" in s:
            noise = s["noise"]
            lines += [f"FID noise over the {len(noise['points'])} three-seed points: relative std over the "
                      f"{len(GRID_SEEDS)} seeds (prefixes of N images) and over disjoint blocks of N images; std of "
                      "FID(best) - FID(second) on common random numbers (same seeds and batches) vs independent "
                      "ones (blocks paired with a different seed or block):", "",
                      "| N | rel. std, seeds | rel. std, blocks | blocks | std diff, common | std diff, independent |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in noise["rungs"]:
                d = r.get("difference", {})
                nblocks = next(iter(r["points"].values()))["blocks"]
                lines.append(f"| {r['N']} | {100 * r['rel_std_seeds_mean']:.1f} % | "
                             f"{100 * r['rel_std_blocks_mean']:.1f} % | {nblocks} | "
                             f"{d.get('std_common', math.nan):.3f} | {d.get('std_independent', math.nan):.3f} |")
            lines.append("")
        if s.get("rho"):
            lines += [f"Spearman rho with the N={a.n_broad} FID of the stage-1 points (proxy: {PROXY_IMAGES} images, "
                      f"seeds {', '.join(map(str, PROXY_SEEDS))}, mean over seeds; gap = |vocab_evenness - "
                      "div_uncond| in natural units):", "",
                      "| subset | n | gap | " + " | ".join(SIGNALS) + " |", "| --- | ---: |" + " ---: |" * 5]
            lines += [f"| {k} | {v['n']} | {v['gap']:+.2f} | " + " | ".join(f"{v[x]:+.2f}" for x in SIGNALS) + " |"
                      for k, v in s["rho"].items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="conf/backbone/NAME.yaml: the checkpoints sampled")
    p.add_argument("--max-weight", type=float, default=DEFAULT_MAX_WEIGHT,
                   help="largest weight of the broad scan (30: the sweep's search.max_weight)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="guidance kinds sampled")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"results folder (grid.json, features/); default {DEFAULT_CACHE}, another backbone's "
                        f"{default_cache('tiny_small')} (tiny_small), {DEFAULT_CACHE}_NAME")
    p.add_argument("--ref-cache", type=Path, default=None, help="reference statistics folder (<cache>/reference)")
    p.add_argument("--reference", type=int, default=8000, help="real images of the FID reference")
    p.add_argument("--n-broad", type=int, default=512, help="images per point in the broad scan")
    p.add_argument("--n-full", type=int, default=4096, help="images per point and seed when refined")
    p.add_argument("--refine", type=int, default=4, help="best broad-scan points refined (plus 2 per kind)")
    p.add_argument("--confirm", type=int, default=1, help="best refined points given 3 seeds (plus each kind's best)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT broad points (smoke tests)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--write", action="store_true",
                   help=f'write docs/BENCHMARKS.md "## {SECTION}" (another backbone: "## {SECTION} (NAME)")')
    p.add_argument("--report", action="store_true", help="sample nothing: report what the cache holds so far")
    Setting.add_arguments(p, "every point (its sweeps run so: bench_answer.py takes the same options)")
    args = p.parse_args(argv)
    args.cache = args.cache or default_cache(args.backbone)
    for n in (args.n_broad, args.n_full):
        if n % BATCH or n <= 128:
            p.error(f"image counts must be multiples of {BATCH} above 128 (the feature dimension), got {n}")
    torch.set_num_threads(args.threads)
    command = "python bench/bench_grid.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    grid = Grid(args.cache, args, command.strip())
    try:
        if not args.report:
            run_stages(grid, args)
    finally:
        grid.close()
    body = grid.markdown()
    atomic_write(args.cache / "grid.md", (body + "\n").encode())
    publish(body, section_name(SECTION, args.backbone, Setting.of(args)), args.write)
    return 0


def run_stages(grid: Grid, args: argparse.Namespace) -> None:
    """Stages 1-5 of the module docstring, each resumed from the cache."""
    seed0 = GRID_SEEDS[0]
    stage1 = broad_points(args.max_weight, tuple(args.kinds))[:args.limit]
    grid.set_stage("1", stage1)
    grid.sample("1 broad", [(q, seed0, args.n_broad) for q in stage1])
    stage1b = neighbour_points(grid.fids(stage1, seed0, args.n_broad), SEARCH_MAX_WEIGHT)
    grid.set_stage("1b", stage1b)
    grid.sample("1b neighbours", [(q, seed0, args.n_broad) for q in stage1b])
    broad = grid.fids(stage1 + stage1b, seed0, args.n_broad)
    refine = list(dict.fromkeys(ranked(broad)[:args.refine] + best_of_kinds(broad, 2)))
    grid.set_stage("2", refine)
    grid.sample("2 refine", [(q, seed0, args.n_full) for q in refine])
    grid.measure_proxy(list(broad)[::2])   # every other point first (>= 24 spanning the range), the rest last
    full = grid.fids(refine, seed0, args.n_full)
    confirm = sorted(dict.fromkeys(ranked(full)[:args.confirm] + best_of_kinds(full, 1)), key=full.get)
    grid.set_stage("3", confirm)
    grid.sample("3 seeds", [(q, s, args.n_full) for q in confirm for s in GRID_SEEDS[1:]])
    grid.measure_proxy(list(broad))
    grid.save()

if __name__ == "__main__":
    sys.exit(main())
