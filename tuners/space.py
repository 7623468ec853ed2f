"""The guidance search space: candidates, their kinds, ranges that grow, Optuna suggestions and design points.

A candidate's kind follows from which terms it has: ``cfg`` (w only), ``igg`` (w′ and a window), ``mixed`` (both).
Every kind has its own weights and ranges; a range starts where the configuration says and grows, up to
``search.max_weight``, while the best candidate found lies at its upper edge (:class:`Ranges`). With
``search.intervals`` a candidate also has its guidance interval: the scales ``start <= k < end`` it guides
(``guidance.schedule=interval``, Switti's CFG on/off scales), a categorical like the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from pipeline.config.schema import SearchConfig
from pipeline.core.guidance import KINDS

WEIGHTS = ("w_cfg", "w_igg")


Interval = tuple[int, int | None]  # guided scales start <= k < end; end None: to the last scale


def interval_code(interval: Sequence[int | None]) -> str:
    """An interval as an Optuna categorical choice: ``"2:7"``, ``"2:"`` (to the last scale)."""
    start, end = interval
    return f"{start}:{'' if end is None else end}"


def parse_interval(code: str) -> Interval:
    """The interval of :func:`interval_code`'s string."""
    start, end = code.split(":")
    return int(start), None if end == "" else int(end)


@dataclass(frozen=True)
class Candidate:
    """One guidance setting. A weight of None drops its term; window None is global IGG attention; interval None
    guides the sweep's own schedule (``guidance.schedule_start`` .. ``schedule_end``)."""

    w_cfg: float | None
    w_igg: float | None
    window: int | None
    interval: Interval | None = None

    def __post_init__(self) -> None:
        if self.interval is not None:  # a stored record holds a list
            start, end = self.interval
            object.__setattr__(self, "interval", (int(start), None if end is None else int(end)))

    @property
    def kind(self) -> str:
        """The kind (pipeline.core.guidance.KINDS) whose weights it sets; ``unguided`` when neither term is on."""
        weights = tuple(self.weights())
        return next((k.name for k in KINDS.values() if k.weights == weights), "unguided")

    def key(self, decimals: int) -> tuple[float | None, float | None, int | None, Interval | None]:
        """Identity after rounding the weights: candidates with equal keys are the same candidate."""

        def r(w: float | None) -> float | None:
            return None if w is None else round(w, decimals)

        return (r(self.w_cfg), r(self.w_igg), self.window if self.w_igg is not None else None, self.interval)

    def weights(self) -> dict[str, float]:
        """The weights this candidate sets (w_cfg and/or w_igg)."""
        return {name: w for name in WEIGHTS if (w := getattr(self, name)) is not None}

    def as_dict(self) -> dict[str, Any]:
        """w_cfg, w_igg, window; and interval [start, end] when the candidate has its own."""
        out: dict[str, Any] = {"w_cfg": self.w_cfg, "w_igg": self.w_igg, "window": self.window}
        if self.interval is not None:
            out["interval"] = list(self.interval)
        return out

    def identity(self) -> list:
        """What names the candidate in seeds and file names: its weights and window, and its interval if it has
        one (so a sweep without intervals keeps the seeds and files it always had)."""
        return list(self.as_dict().values())

    def label(self) -> str:
        """Short human-readable form, e.g. ``w=2.50 w'=1.00 win=3``."""
        parts = []
        if self.w_cfg is not None:
            parts.append(f"w={self.w_cfg:.2f}")
        if self.w_igg is not None:
            parts.append(f"w'={self.w_igg:.2f} win={'global' if self.window is None else self.window}")
        if self.interval is not None:
            parts.append(f"scales {interval_code(self.interval)}")
        return " ".join(parts) if parts else "unguided"


@dataclass
class Ranges:
    """The current [low, high] of each weight of each kind; they grow at their upper edge up to a cap.

    State is plain data (kind -> weight -> [low, high]) so a stage can store it and a resumed sweep rebuild it.
    """

    spans: dict[str, dict[str, list[float]]]
    cap: float
    edge: float
    grow: float

    @classmethod
    def start(cls, kinds: list[str], search: SearchConfig) -> Ranges:
        spans = {k: {w: list(getattr(search, w)) for w in KINDS[k].weights} for k in kinds}
        return cls(spans, search.max_weight, search.edge, search.grow)

    def at_edge(self, candidate: Candidate) -> list[str]:
        """The weights of `candidate` in the top `edge` fraction of their range (and below the cap)."""
        spans = self.spans[candidate.kind]
        return [w for w, v in candidate.weights().items()
                if spans[w][1] < self.cap and v >= spans[w][1] - self.edge * (spans[w][1] - spans[w][0])]

    def widen(self, candidate: Candidate) -> list[str]:
        """Grow every range `candidate` sits at the edge of (span × grow, capped); returns the weights grown."""
        grown = self.at_edge(candidate)
        for w in grown:
            low, high = self.spans[candidate.kind][w]
            self.spans[candidate.kind][w][1] = min(self.cap, low + self.grow * (high - low))
        return grown

    def bounds(self, candidate: Candidate) -> dict[str, str]:
        """Per weight of `candidate`: ``cap`` at the cap, ``low`` at 0 / the range's low, else ``inside``.

        A kind without ranges was not searched (the published default CFG, racing in a sweep of other kinds): its
        weights are ``inside`` unless at the cap.
        """
        spans = self.spans.get(candidate.kind, {})

        def where(w: str, v: float) -> str:
            low = spans[w][0] if w in spans else -math.inf
            return "cap" if v >= self.cap - 1e-9 else "low" if v <= low + 1e-9 else "inside"

        return {w: where(w, v) for w, v in candidate.weights().items()}


@dataclass
class Region:
    """A trust region of one kind: a box around a centre in u = log(1 + w), clipped to [floor, cap] in w; windows are
    not restricted.

    Guidance weights act multiplicatively (FID changes as much from w=3 to 6 as from 6 to 12 on the embedded
    backbone; docs/BENCHMARKS.md, Reference grid), so the box, its edges and its steps are measured in u: `radius` is
    a half-width in log(1 + w) units and the box of centre c is [expm1(log1p(c) - r), expm1(log1p(c) + r)].
    """

    centre: dict[str, float]  # weight name -> w
    radius: dict[str, float]  # weight name -> half-width in log(1 + w)
    cap: float
    floor: float = 0.0  # no weight below this is tried (a term that weak is the kind without it)
    history: list[str] = field(default_factory=list)  # what each update did (grew, kept, shrank)
    direction: dict[str, int] = field(default_factory=dict)  # weight -> side of the last growth (+1 up, -1 down)
    window: int | None = None  # the window of the best candidate (IGG kinds)
    interval: Interval | None = None  # and its interval
    step: dict[str, float] = field(default_factory=dict)  # weight -> half the radius before the last update

    def _clip(self, w: float) -> float:
        return min(self.cap, max(self.floor, w))

    def box(self) -> dict[str, tuple[float, float]]:
        return {w: (self._clip(math.expm1(math.log1p(c) - self.radius[w])),
                    self._clip(math.expm1(math.log1p(c) + self.radius[w]))) for w, c in self.centre.items()}

    def edges(self, candidate: Candidate, edge: float) -> dict[str, int]:
        """Weights of `candidate` in the outer `edge` fraction of the box in u (not at the floor or the cap):
        +1 high, -1 low."""
        out = {}
        for w, v in candidate.weights().items():
            low, high = self.box()[w]
            margin = edge * (math.log1p(high) - math.log1p(low))
            if math.log1p(v) >= math.log1p(high) - margin and high < self.cap:
                out[w] = 1
            elif math.log1p(v) <= math.log1p(low) + margin and low > self.floor:
                out[w] = -1
        return out

    def update(self, best: Candidate, improved: bool, *, edge: float, grow: float, shrink: float) -> None:
        """Move to the kind's best; grow when it lies on the edge, shrink when the round found nothing better."""
        self.direction = self.edges(best, edge)
        action = "grew" if self.direction else "kept" if improved else "shrank"
        factor = {"grew": grow, "kept": 1.0, "shrank": shrink}[action]
        self.centre = dict(best.weights())
        self.step = {w: r / 2 for w, r in self.radius.items()}
        self.radius = {w: r * factor for w, r in self.radius.items()}
        self.history.append(action)
        self.window, self.interval = best.window, best.interval

    def probe(self) -> Candidate | None:
        """After a growth, the step the region grew for: the weights on the edge moved on by half the radius before
        the growth (in u), just past the old box; a longer step overshoots a basin the best has only just reached."""
        if not self.history or self.history[-1] != "grew":
            return None
        moved = {w: self._clip(math.expm1(math.log1p(c) + self.direction.get(w, 0) * self.step[w]))
                 for w, c in self.centre.items()}
        return Candidate(w_cfg=moved.get("w_cfg"), w_igg=moved.get("w_igg"),
                         window=self.window if "w_igg" in moved else None, interval=self.interval)


def suggest(trial: optuna.Trial, kind: str, box: dict[str, tuple[float, float]], windows: list[int | None], *,
            log: bool = False, intervals: list[Interval] | None = None) -> Candidate:
    """Ask the trial for the weights of `kind` inside `box` (weight -> (low, high), low > 0 with `log`: sampled
    uniformly in log w), with IGG a window, and with `intervals` one of them (categorical ``interval``)."""
    params = KINDS[kind].params
    w_cfg = trial.suggest_float("w_cfg", *box["w_cfg"], log=log) if "w_cfg" in params else None
    w_igg = trial.suggest_float("w_igg", *box["w_igg"], log=log) if "w_igg" in params else None
    window = trial.suggest_categorical("window", list(windows)) if "window" in params else None
    interval = None if intervals is None else parse_interval(
        trial.suggest_categorical("interval", [interval_code(i) for i in intervals]))
    return Candidate(w_cfg=w_cfg, w_igg=w_igg, window=window, interval=interval)


def trial_params(c: Candidate) -> dict[str, Any]:
    """The Optuna params that ask for `c` again (``enqueue_trial``): its weights, window and interval."""
    params: dict[str, Any] = c.weights()
    if c.w_igg is not None:
        params["window"] = c.window
    if c.interval is not None:
        params["interval"] = interval_code(c.interval)
    return params


def from_params(params: dict[str, Any]) -> Candidate:
    """The candidate of a finished Optuna trial (its params hold only the names of its kind)."""
    interval = params.get("interval")
    return Candidate(w_cfg=params.get("w_cfg"), w_igg=params.get("w_igg"), window=params.get("window"),
                     interval=None if interval is None else parse_interval(interval))


def design_points(kinds: list[str], ranges: Ranges, fractions: list[float],
                  interval: Interval | None = None) -> list[Candidate]:
    """Stage 1 design points: for each kind, every weight at the same fraction of its range, global IGG attention,
    `interval` (with ``search.intervals``, the first)."""

    def at(kind: str, name: str, f: float) -> float | None:
        if name not in ranges.spans[kind]:
            return None
        low, high = ranges.spans[kind][name]
        return low + f * (high - low)

    return [Candidate(w_cfg=at(k, "w_cfg", f), w_igg=at(k, "w_igg", f), window=None, interval=interval)
            for k in kinds for f in sorted(set(fractions))]
