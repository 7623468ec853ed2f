"""Sweep configuration: typed schemas (Hydra ConfigStore), composition from conf/, and validation.

Every knob of a sweep lives here or in conf/ (one source of truth). `load_config(overrides)` composes conf/sweep.yaml
with command-line overrides, checks every value, and returns a typed `SweepConfig`; any problem raises `ConfigError`
(a ValueError) with one line naming the key and the fix, before anything is written anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.backbones.load import KINDS as BACKBONE_KINDS
from pipeline.core.guidance import INTERVAL_SCHEDULES, KINDS, SCHEDULES
from pipeline.data.files import SHARD_INDEXES, sqlite_path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "backbones" / "weights"
GROUPS = ("backbone", "guidance", "search", "proxy", "screen", "refine", "confirm", "launcher", "tracking")
SAMPLERS = ("tpe", "gp", "random")
EVENNESS_KINDS = ("vocab", "tokens")
DIVERGENCE_REFERENCES = ("uncond", "cond")
FID_METRICS = ("fid", "isc", "kid", "prc")  # torch-fidelity's: FID, Inception Score, KID, precision/recall
EMBEDDED_REFERENCE = "shapes"


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key and the fix."""


@dataclass
class BackboneConfig:
    """A scale-wise generator: checkpoints, patch schedule, published sampling defaults, FID setup."""

    name: str = MISSING
    kind: str = "var"  # var: class-conditional VAR state dicts; switti: text-to-image Hub folders; infinity: .pth files
    vae_ckpt: str = MISSING  # tokenizer state dict (official VAR layout); switti: the VQVAE-Switti folder
    var_ckpt: str = MISSING  # transformer state dict (official VAR layout); switti: the Switti folder
    text_encoder: str | None = None  # switti: the openai/clip-vit-large-patch14 folder; infinity: google/flan-t5-xl
    text_encoder_2: str | None = None  # switti: the laion/CLIP-ViT-bigG-14-laion2B-39B-b160k folder
    prompts: str | None = None  # switti: CSV of the prompt set (Switti's eval_prompts format, column `captions`)
    patch_nums: list[int] = MISSING  # side of the token map at each scale; checked against the checkpoint
    top_k: int = 0  # published sampling defaults (0 = no top-k / top-p filtering)
    top_p: float = 0.0
    default_cfg: float = 1.5  # published CFG weight: the baseline candidate of the confirm stage
    last_scale_temp: float | None = None  # Switti: divides the logits of the scales after the guidance interval
    drop_uncond: bool = False  # Switti: no unconditional half of the batch once no later scale is guided
    # infinity: the temperature of every scale's logits, one value or one per scale (the official tau / tau_list)
    tau: list[float] = field(default_factory=lambda: [1.0])
    negative_prompt: str | None = None  # infinity: the unconditional branch encodes it (null: learned cfg_uncond)
    fid_extractor: str = "inception-v3-compat"  # torch-fidelity feature extractor name
    fid_reference: str = MISSING  # ADM .npz, a folder of real images, or "shapes" (the embedded dataset)
    fid_image_size: int | None = None  # resized (shorter side, Lanczos, centre crop) before FID; null: as sampled


@dataclass
class GuidanceConfig:
    """Which guidance kinds the sweep compares; the answer is the best kind with its weights."""

    name: str = MISSING
    kinds: list[str] = MISSING  # the kinds compared: cfg (w), igg (w', window), mixed (w, w', window)
    # ratio at scale k: linear k/(K-1), constant 1; interval: linear inside [start, end), constant_interval: 1 inside
    schedule: str = "linear"
    schedule_start: int = 0  # first guided scale index (interval schedules)
    schedule_end: int | None = None  # first unguided scale index after the interval (null: K)


@dataclass
class SearchConfig:
    """The weights searched: where the proxy starts, the cap of every stage, IGG windows and guidance intervals.

    A range is [low, high]; when the proxy's best lies in its top `edge` fraction the range grows by `grow`, up to
    max_weight. The screen (ScreenConfig) covers [refine.min_weight, max_weight] whatever the starting ranges.
    """

    n_trials: int = 24  # proxy trials after the design points (0: no proxy stage)
    sampler: str = "tpe"  # tpe | gp | random
    n_startup_trials: int = 8  # random trials before the model-based sampler takes over
    w_cfg: list[float] = field(default_factory=lambda: [0.0, 6.0])  # where the proxy starts: [low, high]
    w_igg: list[float] = field(default_factory=lambda: [0.0, 6.0])  # where the proxy starts: [low, high]
    # IGG windows: odd sizes, null = global. Each window multiplies the IGG trials; on the embedded backbone window 3
    # is worse than global attention at every weight measured (docs/BENCHMARKS.md, Reference grid).
    windows: list[int | None] = field(default_factory=lambda: [None])
    # Guidance intervals searched like the window (needs guidance.schedule=interval): [start, end] pairs of scale
    # indices, guided while start <= k < end (end null: to the last scale), e.g. [[0,null],[2,null],[2,8]] for
    # Switti's CFG on/off scales (Kynkäänniemi et al. 2024); the proxy's design points use the first. null: every
    # candidate guides guidance.schedule_start .. schedule_end.
    intervals: list[Any] | None = None
    max_weight: float = 30.0  # the wall: no stage tries a weight past it, and the report warns at it
    edge: float = 0.1  # a best candidate in the top `edge` fraction of a range is at its edge: the range grows
    grow: float = 2.0  # factor on the range's span when it grows
    max_grows: int = 3  # proxy rounds that may grow the ranges (each adds n_trials // 2 trials)

    def interval_choices(self) -> list[tuple[int, int | None]] | None:
        """search.intervals as (start, end) tuples, or None when the interval is not searched."""
        return None if self.intervals is None else [(int(a), None if b is None else int(b)) for a, b in self.intervals]


@dataclass
class ProxyConfig:
    """Stage 1 proxy trials: the evenness-divergence equilibrium gap |E - D| on a small batch."""

    num_images: int = 32  # images sampled per proxy trial (same labels and seed for every trial)
    batch_size: int = 32
    evenness: str = "vocab"  # vocab: H(softmax)/ln V of the guided logits; tokens: evenness of the nudge
    reference: str = "uncond"  # divergence of the guided logits from the uncond | cond logits
    design: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # enqueued first: fractions of ranges


@dataclass
class ScreenConfig:
    """The global stage (tuners/screen.py): every kind over the whole allowed range at low-N FID, by successive
    halving, before any trust region.

    Each curve (CFG's w, IGG's w' per window, mixed along rays w' / (w + w') = share) gets `points` weights evenly
    spaced in log(1 + w) from refine.min_weight to search.max_weight: any basin wider than that spacing (0.36 at 10
    points) holds a point, wherever it lies. The points are scored at the first rung's images, then the best `keep`
    share of each curve (each basin's best first) is extended to the next rung (images added, never redrawn).
    """

    points: int = 10  # weights per curve
    rungs: list[int] = field(default_factory=lambda: [256, 512])  # images per point at each rung, up to refine's
    keep: float = 0.4  # share of a curve's points that go on to the next rung
    shares: list[float] = field(default_factory=lambda: [0.5])  # mixed: the share of w' in w + w' of each ray
    # at most this many basins, each not worse than the best beyond noise (paired bootstrap at the last rung),
    # lowest FID there first, become trust regions of the refinement
    regions: int = 3


@dataclass
class RefineConfig:
    """FID refinement: a seeded Optuna search inside a trust region around each basin the screen kept, starting
    from the basin's screened points. The region lives in log(1 + weight): its starting half-width is the screen's
    spacing, and edge and its steps are in those units; weights are sampled uniformly in log weight."""

    # FID trials per region (in rounds of launcher.workers trials per region). The screen already resolves a basin
    # to its spacing, so a region needs few: at 4 a default sweep on `tiny` sampled 30,240 images (over the
    # 30,000 budget) and its answer was a screened point all the same (docs/BENCHMARKS.md, Answer quality).
    n_trials: int = 2
    num_images: int = 512  # images per trial; the same labels for every candidate
    # Every candidate samples the same labels; its sampler seeds are its own (independent FID noise, which the
    # smoothing averages out). true: the sweep's seeds for every candidate (common random numbers); on the embedded
    # backbone they do not shrink the noise of a difference at distinct weights (docs/BENCHMARKS.md, Reference grid).
    common_seeds: bool = False
    min_weight: float = 0.25  # no weight below this is refined (sampled uniformly in log weight)
    edge: float = 0.25  # a best in the outer `edge` fraction of the region (in log(1 + weight)) is on its edge
    grow: float = 2.0  # the region grows by this when a round's best lies on its edge
    shrink: float = 0.5  # and shrinks by this when a round does not improve the kind's best
    sampler: str = "tpe"  # tpe | random (GP needs a fixed search space; the region moves)
    n_startup_trials: int = 4
    # Trials (and the screen's points) are ranked by a smoothed FID (Gaussian-process posterior mean of log FID,
    # tuners/surrogate.py), not by the single noisy value: the lengthscale in log(1 + weight) units, and how alike
    # two IGG windows (or two guidance intervals) at the same weights are assumed, in [0, 1].
    lengthscale: float = 0.5
    window_kinship: float = 0.5


@dataclass
class ConfirmConfig:
    """The race: the finalists at growing N (each rung extends a finalist's own images); a finalist worse than the
    current best beyond noise (bootstrap over images) leaves; a cost cap keeps at most `keep` of the rest (each
    refinement region's best first, then the lowest FIDs) and `final_max` for the last rung, which decides (on its
    hold-out images with `holdout`). Every FID has an interval at `level`."""

    # best distinct refined candidates (each kind's, then each region's best first), plus the published default
    finalists: int = 5
    # Finalists of one kind and window are at least this far apart in log(1 + weight): a near neighbour of a
    # finalist has nearly its smoothed FID, and racing both would spend two finalists on one point.
    separation: float = 0.15
    # The last rung decides. On the embedded backbone the basin of good weights is flat to within a few percent,
    # and fewer images (a race to 3072 or 2048) picked points at its lower edge: seed 2's answer re-measured 1.043 x
    # the grid best (docs/BENCHMARKS.md, Sweep time budget). Real checkpoints: e.g. [10000, 25000, 50000] (README).
    rungs: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    keep: float = 0.5  # cost cap: at most this share of the finalists left (lowest FIDs) go on to the next rung
    final_max: int = 2  # and at most this many to the last rung
    # A rung that leaves one finalist (every other one worse beyond noise) decides the race: the winner goes
    # straight to the last rung (with holdout; else it stops there). false: every rung runs.
    stop_when_decided: bool = True
    # The last rung decides on the images it adds, which no stage has seen, and the winner's FID is theirs: its
    # own earlier images chose it and flatter it (on `tiny` an answer scored 7.76 on its 4,096 sweep images and
    # 8.60-9.50 on three fresh seeds; docs/BENCHMARKS.md, The global screen). false: on all its images.
    holdout: bool = True
    bootstrap: int = 200  # paired bootstrap resamples over images per comparison
    # Resample images inside each condition (every candidate samples the same classes or prompts, so only the
    # sampler's noise is random). false: over all images, which also redraws the mix of classes and overstates the
    # noise between sampler seeds (docs/BENCHMARKS.md, Answer quality "Noise model").
    stratify: bool = True
    level: float = 0.95  # confidence of every interval and of "worse beyond noise"
    reference: str = "${backbone.fid_reference}"  # FID reference: an ADM .npz, an image folder or "shapes"
    reference_num_images: int = 2000  # images of the embedded dataset when reference is "shapes"
    extractor_weights: str | None = None  # local weights of the FID feature extractor (offline clusters)
    clip_weights: str | None = None  # text-to-image: a local Hub CLIP folder; FID jobs also measure the CLIP score
    metrics: list[str] = field(default_factory=lambda: list(FID_METRICS))
    batch_size: int = 64
    decimals: int = 2  # candidates equal after rounding weights to this many decimals are one candidate


@dataclass
class LauncherConfig:
    """Ray actor pool: start a local Ray (address null) or join a cluster (auto or host:port)."""

    workers: int = 2  # actors; each loads the backbone once
    address: str | None = None  # null: start a local Ray; auto or host:port: join a cluster
    cpus_per_worker: int = 1
    gpus_per_worker: int = 1  # used only when the cluster has GPUs
    num_cpus: int | None = None  # CPUs of a local Ray (null: workers * cpus_per_worker)
    object_store_memory: int = 200_000_000  # bytes, local Ray only
    connect_timeout_s: float = 15.0  # bounded wait for a cluster address
    max_retries: int = 2  # re-runs of a job whose actor died


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///${root}/mlflow.db"  # MLflow tracking store (the one `make ui` opens)


@dataclass
class SweepMeta:
    # MLflow experiment and Optuna study names; rerunning a name resumes it. One per (backbone, guidance), so the
    # jobs of -m over backbones and kinds do not collide.
    name: str = "${backbone.name}-${guidance.name}"
    output_dir: str = "${root}/sweeps/${sweep.name}"  # best.yaml, report.md and plots
    grid_images: int = 16  # images in each trial's sample grid
    grid_nrow: int = 8  # images per row of the grid
    heatmap_images: int = 4  # images (rows) in each trial's guidance heat map


@dataclass
class GenerateConfig:
    """``python -m pipeline.generate``: sample one guidance setting as a sweep samples it (by default a winner)."""

    best: str | None = None  # a sweep's best.yaml: its backbone, checkpoints, weights and sampling are used
    w_cfg: float | None = "${backbone.default_cfg}"  # type: ignore[assignment]  # without `best`: the weights
    w_igg: float | None = None
    window: int | None = None
    num_images: int = 64  # the first N images of the candidate (the sweep's labels, batches and seeds)
    grid: int = 64  # images in grid.png
    nrow: int = 8
    device: str | None = None  # null: cuda if available
    out: str = "${root}/generate/${sweep.name}"  # grid.png and samples.npz (ADM layout)


@dataclass
class SweepConfig:
    sweep: SweepMeta = field(default_factory=SweepMeta)
    seed: int = 0
    root: str = "mlruns"  # folder of the default stores
    storage: str = "sqlite:///${root}/optuna.db"  # Optuna storage URL (SQLAlchemy)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def schema_keys(width: int = 110) -> str:
    """Every key of the schema, fully qualified, a line (wrapped at `width`) per section: ``--help``'s key list."""

    def walk(node: Any, prefix: str) -> list[str]:
        if not dataclasses.is_dataclass(node):
            return [prefix]
        return [k for f in dataclasses.fields(node) for k in walk(getattr(node, f.name), f"{prefix}{f.name}.")]

    cfg = SweepConfig()
    sections = [[k.rstrip(".") for k in walk(getattr(cfg, f.name), f"{f.name}.")] for f in dataclasses.fields(cfg)]
    top = [keys[0] for keys in sections if len(keys) == 1]  # seed, root, storage: one line
    lines = []
    for keys in [top, *(keys for keys in sections if len(keys) > 1)]:
        lines += textwrap.wrap(" ".join(keys), width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def _register() -> None:
    ConfigStore.instance().store(name="schema", node=SweepConfig)
    if not OmegaConf.has_resolver("weights"):
        OmegaConf.register_new_resolver("weights", lambda name: str(WEIGHTS_DIR / name))
    if not OmegaConf.has_resolver("schema_keys"):
        OmegaConf.register_new_resolver("schema_keys", schema_keys)


_register()


def group_options(group: str, config_dir: Path = CONF_DIR) -> list[str]:
    """Names of the YAML options of one config group, sorted."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _check_group_overrides(overrides: list[str], config_dir: Path) -> None:
    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete():
            raise ConfigError(f"{override.input_line}: adding or deleting keys is not supported; set an existing key")
        if group in GROUPS and isinstance(override.value(), str):
            options = group_options(group, config_dir)
            if override.value() not in options:
                raise ConfigError(
                    f"{group}={override.value()} is unknown; choose one of {', '.join(options)} "
                    f"(e.g. {group}={options[0]})"
                )


def compose_config(overrides: list[str], config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose conf/sweep.yaml with Hydra overrides (no output dir, no chdir). Raises ConfigError."""
    try:
        _check_group_overrides(overrides, config_dir)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="sweep", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _one_line(err: Exception) -> str:
    reason = _first_line(err)
    if err.__cause__ is not None:
        reason = f"{reason}: {_first_line(err.__cause__)}"
    return f"{reason} (`python -m pipeline.sweep --cfg job` lists every key and its value)"


def to_schema(cfg: DictConfig) -> SweepConfig:
    """Resolve interpolations and convert to the typed dataclasses. Raises ConfigError."""
    try:
        schema = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    assert isinstance(schema, SweepConfig)
    return schema


def _override(value: Any) -> str:
    """A value as a Hydra override writes it: null, true, [a,b]."""
    if value is None or isinstance(value, bool):
        return str(value).lower() if value is not None else "null"
    if isinstance(value, list):
        return f"[{','.join(_override(v) for v in value)}]"
    return str(value)


def _eg(key: str) -> str:
    """``e.g. key=<the schema's default>``: the fix a message suggests is the default, stated once (the schema)."""
    return f"e.g. {key}={_override(functools.reduce(getattr, key.split('.'), SweepConfig()))}"


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive (got {value}); set {_eg(key)}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value} is unknown; choose one of {', '.join(choices)}")


def _range(key: str, bounds: list[float]) -> None:
    if len(bounds) != 2:
        raise ConfigError(f"{key} must be [low, high] (got {bounds}); set e.g. {key}=[0,6]")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"{key}=[{low}, {high}] is empty or inverted; give low < high, e.g. {key}=[0,6]")
    if low < 0:
        raise ConfigError(f"{key}: guidance weights start at 0 (got low={low}); set e.g. {key}=[0,{high}]")


def _existing_file(key: str, path: str, fix: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} not found; {fix}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {path} is not readable; fix its permissions or set {key}=PATH")


def _writable_root(key: str, folder: Path) -> None:
    """The nearest existing ancestor of `folder` must be a folder that accepts a file (probed, then removed)."""
    probe = folder.resolve()
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ConfigError(
            f"{key}: {folder} is not writable ({type(err).__name__}: {probe}); choose a writable folder, "
            "e.g. root=/tmp/guidetune"
        ) from None


def validate(cfg: SweepConfig) -> None:
    """Check every value a user may set; raise ConfigError (one line, with the fix) on the first problem."""
    g, s, p, r, c, la = cfg.guidance, cfg.search, cfg.proxy, cfg.refine, cfg.confirm, cfg.launcher
    if not cfg.sweep.name or "/" in cfg.sweep.name:
        raise ConfigError(f"sweep.name={cfg.sweep.name!r} must be a non-empty name without '/'; e.g. sweep.name=run1")
    if not g.kinds or len(set(g.kinds)) != len(g.kinds):
        raise ConfigError(f"guidance.kinds={g.kinds} must list distinct kinds; e.g. guidance.kinds=[cfg,igg,mixed]")
    for kind in g.kinds:
        _choice("guidance.kinds", kind, tuple(KINDS))
    _choice("guidance.schedule", g.schedule, SCHEDULES)
    K = len(cfg.backbone.patch_nums)
    end = K if g.schedule_end is None else g.schedule_end
    if not 0 <= g.schedule_start < end <= K:
        raise ConfigError(
            f"guidance.schedule_start={g.schedule_start}, schedule_end={g.schedule_end} must satisfy "
            f"0 <= start < end <= {K} (the backbone's scales); e.g. guidance.schedule_start=0"
        )
    _choice("search.sampler", s.sampler, SAMPLERS)
    _choice("refine.sampler", r.sampler, ("tpe", "random"))
    _choice("proxy.evenness", p.evenness, EVENNESS_KINDS)
    _choice("proxy.reference", p.reference, DIVERGENCE_REFERENCES)
    for metric in c.metrics:
        _choice("confirm.metrics", metric, FID_METRICS)
    if "fid" not in c.metrics:
        raise ConfigError("confirm.metrics must include fid (it ranks the candidates); e.g. confirm.metrics=[fid,isc]")
    for key in (
        "search.n_startup_trials", "search.max_weight", "refine.n_trials", "refine.num_images", "screen.regions",
        "refine.n_startup_trials", "refine.lengthscale", "refine.min_weight", "confirm.finalists",
        "confirm.final_max", "confirm.bootstrap", "proxy.num_images", "proxy.batch_size", "confirm.batch_size",
        "confirm.reference_num_images", "sweep.grid_images", "sweep.grid_nrow", "sweep.heatmap_images",
        "launcher.workers", "launcher.cpus_per_worker", "launcher.gpus_per_worker", "launcher.object_store_memory",
        "launcher.connect_timeout_s",
    ):
        _positive(key, functools.reduce(getattr, key.split("."), cfg))
    if la.num_cpus is not None and la.num_cpus < la.workers * la.cpus_per_worker:
        raise ConfigError(
            f"launcher.num_cpus={la.num_cpus} is fewer than launcher.workers x cpus_per_worker "
            f"({la.workers} x {la.cpus_per_worker}); raise it or set launcher.num_cpus=null"
        )
    if s.n_trials < 0 or s.max_grows < 0:
        raise ConfigError("search.n_trials and search.max_grows must be >= 0 (0: no proxy stage / no growth)")
    for key, value in (("search.edge", s.edge), ("refine.edge", r.edge), ("refine.shrink", r.shrink),
                       ("confirm.level", c.level),
                       ("confirm.keep", c.keep)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{key}={value} must lie strictly between 0 and 1; {_eg(key)}")
    for key, value in (("search.grow", s.grow), ("refine.grow", r.grow)):
        if value <= 1.0:
            raise ConfigError(f"{key}={value} must be > 1 (the factor a range grows by); {_eg(key)}")
    if not 0.0 < r.min_weight < s.max_weight:
        raise ConfigError(f"refine.min_weight={r.min_weight} must lie in (0, search.max_weight={s.max_weight}) "
                          f"(weights are refined in log scale); {_eg('refine.min_weight')}")
    if c.separation < 0.0:
        raise ConfigError(f"confirm.separation={c.separation} must be >= 0 (0: any distinct finalists); "
                          f"{_eg('confirm.separation')}")
    if not 0.0 <= r.window_kinship <= 1.0:
        raise ConfigError(
            f"refine.window_kinship={r.window_kinship} must lie in [0, 1]; {_eg('refine.window_kinship')}")
    if c.bootstrap < 2:
        raise ConfigError(f"confirm.bootstrap={c.bootstrap} must be >= 2 resamples; {_eg('confirm.bootstrap')}")
    sc = cfg.screen
    if sc.points < 2:
        raise ConfigError(f"screen.points={sc.points} must be >= 2 (the ends of the range); {_eg('screen.points')}")
    if not 0.0 < sc.keep <= 1.0:
        raise ConfigError(f"screen.keep={sc.keep} must lie in (0, 1]; {_eg('screen.keep')}")
    if not sc.shares or any(not 0.0 < share < 1.0 for share in sc.shares):
        raise ConfigError(f"screen.shares={sc.shares} must hold shares of w' in w + w' strictly between 0 and 1; "
                          f"{_eg('screen.shares')}")
    if not sc.rungs or any(b <= a for a, b in itertools.pairwise(sc.rungs)) or sc.rungs[-1] > r.num_images:
        raise ConfigError(f"screen.rungs={sc.rungs} must rise, up to refine.num_images={r.num_images}; "
                          f"{_eg('screen.rungs')}")
    n_images = sorted({*sc.rungs, r.num_images, *c.rungs})
    if not c.rungs or any(b <= a for a, b in itertools.pairwise([r.num_images, *c.rungs])):
        raise ConfigError(f"confirm.rungs={c.rungs} must rise above refine.num_images={r.num_images}; "
                          f"{_eg('confirm.rungs')}")
    if any(n % c.batch_size for n in n_images):
        raise ConfigError(f"screen.rungs, refine.num_images and confirm.rungs ({n_images}) must be multiples of "
                          f"confirm.batch_size={c.batch_size}, so a larger N extends a smaller one; "
                          f"{_eg('confirm.batch_size')}")
    if c.decimals < 0 or la.max_retries < 0:
        raise ConfigError(f"confirm.decimals and launcher.max_retries must be >= 0; {_eg('confirm.decimals')}")
    for name in ("w_cfg", "w_igg"):
        _range(f"search.{name}", getattr(s, name))
        if getattr(s, name)[1] > s.max_weight:
            raise ConfigError(f"search.{name}={getattr(s, name)} reaches past search.max_weight={s.max_weight}; "
                              f"raise search.max_weight or lower the range")
    if {"igg", "mixed"} & set(g.kinds):
        if not s.windows:
            raise ConfigError("search.windows is empty; give odd sizes or null (global), e.g. search.windows=[null,3]")
        for window in s.windows:
            if window is not None and (window < 1 or window % 2 == 0):
                raise ConfigError(
                    f"search.windows: {window} is not an odd size >= 1; use e.g. search.windows=[null,3,5]"
                )
    if s.intervals is not None:
        _intervals(s.intervals, g.schedule, K)
    if not p.design or any(not 0.0 <= f <= 1.0 for f in p.design):
        raise ConfigError(f"proxy.design={p.design} must hold fractions in [0, 1]; {_eg('proxy.design')}")
    if cfg.backbone.fid_image_size is not None and cfg.backbone.fid_image_size < 1:
        raise ConfigError(f"backbone.fid_image_size={cfg.backbone.fid_image_size} must be >= 1 (or null: the sampled "
                          "size); e.g. backbone.fid_image_size=256")
    temp = cfg.backbone.last_scale_temp
    if temp is not None and not temp > 0:
        raise ConfigError(f"backbone.last_scale_temp={temp} must be positive (or null for none); "
                          "e.g. backbone.last_scale_temp=0.1")
    _choice("backbone.kind", cfg.backbone.kind, BACKBONE_KINDS)
    _infinity_sampling(cfg.backbone, K)
    if cfg.backbone.kind == "switti":
        for key in ("vae_ckpt", "var_ckpt", "text_encoder", "text_encoder_2"):
            path = getattr(cfg.backbone, key)
            if path is None or not Path(path).is_dir():
                raise ConfigError(f"backbone.{key}: {path} is not a folder; download the Hub repository into it or "
                                  f"set backbone.{key}=FOLDER (see conf/backbone/{cfg.backbone.name}.yaml)")
        if cfg.backbone.prompts is None:
            raise ConfigError("backbone.prompts is not set; give a CSV of prompts, e.g. "
                              "backbone.prompts=switti/eval_prompts/coco.csv")
        _existing_file("backbone.prompts", cfg.backbone.prompts, "give a CSV of prompts (Switti's eval_prompts)")
    if cfg.backbone.kind == "infinity":
        var_ckpt = Path(cfg.backbone.var_ckpt)
        if var_ckpt.is_dir() and not any((var_ckpt / name).is_file() for name in SHARD_INDEXES):
            raise ConfigError(f"backbone.var_ckpt: {var_ckpt} is a folder without a shard index "
                              f"({' or '.join(SHARD_INDEXES)}); download the sharded checkpoint into it (infinity_8b: "
                              "infinity_8b_weights) or set backbone.var_ckpt=PATH")
        for key in ("vae_ckpt",) if var_ckpt.is_dir() else ("vae_ckpt", "var_ckpt"):
            _existing_file(f"backbone.{key}", getattr(cfg.backbone, key),
                           f"download it or set backbone.{key}=PATH (see conf/backbone/{cfg.backbone.name}.yaml)")
        if cfg.backbone.text_encoder is None or not Path(cfg.backbone.text_encoder).is_dir():
            raise ConfigError(f"backbone.text_encoder: {cfg.backbone.text_encoder} is not a folder; download "
                              "google/flan-t5-xl into it or set backbone.text_encoder=FOLDER")
        if cfg.backbone.prompts is None:
            raise ConfigError("backbone.prompts is not set; give a CSV of prompts (column `captions`)")
        _existing_file("backbone.prompts", cfg.backbone.prompts, "give a CSV of prompts (column `captions`)")
    for key in ("vae_ckpt", "var_ckpt") if cfg.backbone.kind == "var" else ():
        path = getattr(cfg.backbone, key)
        fix = (
            "the embedded weights are missing: reinstall guidetune or run `python -m pipeline.backbones.tiny train`"
            if Path(path).parent == WEIGHTS_DIR
            else f"download it or set backbone.{key}=PATH (see conf/backbone/{cfg.backbone.name}.yaml)"
        )
        _existing_file(f"backbone.{key}", path, fix)
    if c.reference != EMBEDDED_REFERENCE and not Path(c.reference).exists():
        raise ConfigError(
            f"confirm.reference: {c.reference} not found; give an ADM .npz, an image folder or "
            f"'{EMBEDDED_REFERENCE}' (the embedded dataset), e.g. confirm.reference=PATH"
        )
    if c.extractor_weights is not None:
        _existing_file("confirm.extractor_weights", c.extractor_weights, "give the local extractor weights file")
    if c.clip_weights is not None:
        if cfg.backbone.kind == "var":
            raise ConfigError("confirm.clip_weights scores images against prompts; the backbone is class-conditional "
                              "(a text-to-image backbone has prompts), so set confirm.clip_weights=null")
        if not Path(c.clip_weights).is_dir():
            raise ConfigError(f"confirm.clip_weights: {c.clip_weights} is not a folder; download a Hub CLIP model "
                              "into it (e.g. openai/clip-vit-large-patch14) or set confirm.clip_weights=null")
    for key, url in (("tracking.uri", cfg.tracking.uri), ("storage", cfg.storage)):
        db = sqlite_path(url)
        if db is not None:
            _writable_root(key, db.parent)
    _writable_root("sweep.output_dir", Path(cfg.sweep.output_dir))


def _infinity_sampling(b: BackboneConfig, K: int) -> None:
    """ConfigError unless backbone.tau and backbone.negative_prompt are set on Infinity only, tau to one positive
    temperature or one per scale, and Switti's last_scale_temp is not (Infinity's temperature is tau)."""
    if b.kind != "infinity":
        if b.tau != [1.0] or b.negative_prompt is not None:
            raise ConfigError(f"backbone.tau and backbone.negative_prompt are Infinity's (backbone.kind={b.kind}); "
                              "set backbone.tau=[1.0] backbone.negative_prompt=null")
        return
    if len(b.tau) not in (1, K) or not all(math.isfinite(t) and t > 0 for t in b.tau):
        raise ConfigError(f"backbone.tau={_override(b.tau)} must hold one positive temperature or one per scale "
                          f"({K}); e.g. backbone.tau=[0.5]")
    if b.last_scale_temp is not None:
        raise ConfigError(f"backbone.last_scale_temp={b.last_scale_temp} is Switti's; Infinity's temperature is "
                          "backbone.tau (e.g. backbone.tau=[0.5]), so set backbone.last_scale_temp=null")
    if b.negative_prompt is not None and not b.negative_prompt.strip():
        raise ConfigError("backbone.negative_prompt is empty; give a prompt, or null for the learned unconditional "
                          "embedding (the official code's empty negative prompt)")


def _intervals(intervals: list[Any], schedule: str, K: int) -> None:
    """ConfigError unless search.intervals is a list of distinct [start, end] with 0 <= start < end <= K."""
    example = "e.g. search.intervals=[[0,null],[2,null]]"
    if schedule not in INTERVAL_SCHEDULES:
        raise ConfigError(f"search.intervals needs guidance.schedule=interval or constant_interval (it is "
                          f"{schedule}); {example}")
    if not intervals:
        raise ConfigError(f"search.intervals is empty; give [start, end] pairs or null, {example}")
    seen = set()
    for item in intervals:
        ok = isinstance(item, list | tuple) and len(item) == 2 and all(
            v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in item) and item[0] is not None
        end = (K if item[1] is None else item[1]) if ok else None
        if not ok or not 0 <= item[0] < end <= K or tuple(item) in seen:
            raise ConfigError(f"search.intervals: {item} is not a new [start, end] with 0 <= start < end <= {K} (the "
                              f"backbone's scales; end null: to the last); {example}")
        seen.add(tuple(item))


def validated(cfg: DictConfig) -> SweepConfig:
    """Type-check and validate a composed configuration (e.g. the one Hydra hands a job). Raises ConfigError."""
    schema = to_schema(cfg)
    validate(schema)
    return schema


def load_config(overrides: list[str], config_dir: Path = CONF_DIR) -> SweepConfig:
    """Compose, type-check and validate a sweep configuration. Raises ConfigError; touches nothing."""
    return validated(compose_config(overrides, config_dir))


def as_dict(cfg: SweepConfig) -> dict[str, Any]:
    """Plain nested dict of a config (for logging and reports)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
