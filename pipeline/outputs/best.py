"""best.yaml: one typed record of a sweep's answer, how sure it is, what it cost and how to sample it again.

Every part is a dataclass, written with :func:`dataclasses.asdict` (a non-finite float as null) and read back into the
same dataclasses by :func:`read_best`, so readers (pipeline.generate, pipeline.outputs.report, pipeline.outputs.summary)
use attributes, never string keys. A best.yaml written before a field existed still loads (the field takes its default).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.backbones.infinity import InfinityArgs
from pipeline.data.files import atomic_write
from tuners.scoring import Difference, Interval


@dataclass
class Scored:
    """A candidate and its FID with the interval at N images."""

    w_cfg: float | None
    w_igg: float | None
    window: int | None
    kind: str
    num_images: int
    fid: float
    fid_low: float
    fid_high: float
    interval: list[int | None] | None = None  # its guidance interval, when search.intervals searched it


@dataclass
class Default(Scored):
    """The backbone's published CFG in the race, and the winner's gain over it on the same images (> 0: better)."""

    gain: float | None = None


@dataclass
class MarginRecord(Difference):
    """FID(runner-up) − FID(winner) on num_images images from image `start` (> 0: the hold-out images); separated
    when the interval excludes 0."""

    num_images: int = 0
    separated: bool = False
    start: int = 0


@dataclass
class Cost:
    """A stage's finished trials, the images they sampled and their worker seconds."""

    trials: int
    images: int
    worker_s: float


@dataclass
class Sampling:
    """What reproduces the winner's images (pipeline.generate replays it)."""

    schedule: str
    schedule_start: int
    schedule_end: int | None
    top_k: int
    top_p: float
    seed: int  # the winner's sampler seed
    sweep_seed: int
    batch_size: int
    level: float  # of every interval
    bootstrap: str
    patch_nums: list[int]
    labels: str
    batch_seeds: str
    last_scale_temp: float | None = None  # Switti's temperature after the guidance interval
    drop_uncond: bool = False
    tau: list[float] = field(default_factory=lambda: [1.0])  # Infinity's temperature: one value or one per scale
    negative_prompt: str | None = None  # Infinity's unconditional branch (None: the learned embedding)
    prompts: str | None = None  # text-to-image: the prompt set's CSV


@dataclass
class Checkpoint:
    path: str
    sha256: str


@dataclass
class BasinRecord:
    """A basin of the screen: its best point at the last rung, its smoothed FID, whether it was refined, and its
    difference to the best basin (None for the best)."""

    curve: str
    kind: str
    w_cfg: float | None
    w_igg: float | None
    window: int | None
    num_images: int
    fid: float
    smoothed: float
    refined: bool
    worse: Difference | None = None
    interval: list[int | None] | None = None


@dataclass
class Versus(Difference):
    """IGG against CFG: FID(CFG's best) − FID(IGG's best) at N, and the verdict in words."""

    cfg: str = ""
    igg: str = ""
    num_images: int = 0
    fid_cfg: float = math.nan
    fid_igg: float = math.nan
    verdict: str = ""


@dataclass
class RhoRecord:
    """Spearman's ρ(gap, FID) over the screened points, with its interval."""

    value: float
    low: float
    high: float
    n: int


@dataclass
class CurveRecord:
    """One screen curve at its first rung: each point's total weight, FID with its interval, and smoothed FID."""

    kind: str
    num_images: int
    total: list[float] = field(default_factory=list)
    fid: list[float] = field(default_factory=list)
    fid_low: list[float] = field(default_factory=list)
    fid_high: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)


@dataclass
class Best:
    """The content of best.yaml: the answer, how sure it is, what it cost, and how to sample it again."""

    backbone: str
    guidance: str  # the guidance config compared (auto: every kind)
    kind: str  # the winner's kind: cfg | igg | mixed
    w_cfg: float | None
    w_igg: float | None
    window: int | None
    fid: float
    fid_low: float  # the interval at confirm.level (paired bootstrap over images)
    fid_high: float
    num_images: int  # N of that FID
    at_bound: dict[str, str]  # weight -> inside | low | cap (the screen's floor or search.max_weight)
    runner_up: Scored | None  # at the N it shares with the winner
    margin: MarginRecord | None  # FID(runner-up) - FID(winner)
    default: Default | None  # the published default CFG and the winner's gain over it
    cost: dict[str, Cost]  # stage -> its cost; and the total
    sampling: Sampling
    checkpoints: dict[str, Checkpoint]  # backbone key -> file and sha256
    interval: list[int | None] | None = None  # the winner's guidance interval when search.intervals searched it
    clip_score: Interval | None = None  # text-to-image with confirm.clip_weights: the winner's at N
    basins: list[BasinRecord] = field(default_factory=list)  # the screen's basins, best first
    versus: Versus | None = None  # IGG against CFG (a sweep with both kinds)
    proxy_rho: RhoRecord | None = None  # the proxy's direction on this backbone
    curves: dict[str, CurveRecord] = field(default_factory=dict)  # the screen's curves by label
    # Infinity: the winner as the official sampler's arguments (None: another backbone, or an IGG term, which the
    # official code does not have)
    official: InfinityArgs | None = None
    # fid is of the winner's images holdout_from .. holdout_from + num_images - 1: those the race's last rung added,
    # which no stage saw before choosing it (confirm.holdout). None: of its first num_images images.
    holdout_from: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The YAML content: nested dicts and lists, a non-finite float as None."""
        return plain(dataclasses.asdict(self))


BEST_KEYS = tuple(f.name for f in dataclasses.fields(Best))


def plain(x: Any) -> Any:
    """Nested dicts and lists as YAML writes them, a non-finite float as None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    return x


def _build(hint: Any, value: Any) -> Any:
    """`value` (from YAML) as the type `hint`: dataclasses, optionals, lists and dicts of them; a float field's
    null is NaN (FID that was not finite)."""
    if value is None:
        return math.nan if hint is float else None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value) if len(inner) == 1 else value
    if origin is list:
        return [_build(args[0], v) for v in value]
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        fields = {f.name: f for f in dataclasses.fields(hint)}
        return hint(**{k: _build(hints[k], v) for k, v in value.items()
                       if k in fields and not (v is None and fields[k].default_factory is not dataclasses.MISSING)})
    return value


def write_best(path: str | Path, best: Best) -> Path:
    """best.yaml (keys BEST_KEYS), written atomically."""
    return atomic_write(path, yaml.safe_dump(best.as_dict(), sort_keys=False).encode())


def read_best(path: str | Path) -> Best:
    """Load and check a best.yaml; ValueError naming the problem if it is not one."""
    data = yaml.safe_load(Path(path).read_text())
    required = {f.name for f in dataclasses.fields(Best)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(data, dict) or not required <= set(data) <= set(BEST_KEYS):
        keys = sorted(data) if isinstance(data, dict) else data
        raise ValueError(f"{path} is not a guidetune best.yaml (keys {keys}); rerun the sweep to write it")
    try:
        return _build(Best, data)
    except (TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{path} is not a guidetune best.yaml ({err}); rerun the sweep to write it") from None
