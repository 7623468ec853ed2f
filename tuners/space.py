"""The guidance search space: candidates, Optuna suggestions and the fixed calibration design points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from pipeline.config import GuidanceConfig, SearchConfig


@dataclass(frozen=True)
class Candidate:
    """One guidance setting. A weight of None drops its term; window None is global IGG attention."""

    w_cfg: float | None
    w_igg: float | None
    window: int | None

    def key(self, decimals: int) -> tuple[float | None, float | None, int | None]:
        """Identity after rounding the weights: candidates with equal keys are the same candidate."""

        def r(w: float | None) -> float | None:
            return None if w is None else round(w, decimals)

        return (r(self.w_cfg), r(self.w_igg), self.window if self.w_igg is not None else None)

    def as_dict(self) -> dict[str, Any]:
        return {"w_cfg": self.w_cfg, "w_igg": self.w_igg, "window": self.window}

    def label(self) -> str:
        """Short human-readable form, e.g. ``w=2.50 w'=1.00 win=3``."""
        parts = []
        if self.w_cfg is not None:
            parts.append(f"w={self.w_cfg:.2f}")
        if self.w_igg is not None:
            parts.append(f"w'={self.w_igg:.2f} win={'global' if self.window is None else self.window}")
        return " ".join(parts) if parts else "unguided"


def suggest(trial: optuna.Trial, guidance: GuidanceConfig, search: SearchConfig) -> Candidate:
    """Ask the trial for the searched parameters; parameters not searched are off (None)."""
    w_cfg = trial.suggest_float("w_cfg", *search.w_cfg) if "w_cfg" in guidance.params else None
    w_igg = trial.suggest_float("w_igg", *search.w_igg) if "w_igg" in guidance.params else None
    window = trial.suggest_categorical("window", list(search.windows)) if "window" in guidance.params else None
    return Candidate(w_cfg=w_cfg, w_igg=w_igg, window=window)


def from_params(params: dict[str, Any]) -> Candidate:
    """The candidate of a finished Optuna trial (its params hold only the searched names)."""
    return Candidate(w_cfg=params.get("w_cfg"), w_igg=params.get("w_igg"), window=params.get("window"))


def design_points(guidance: GuidanceConfig, search: SearchConfig, fractions: list[float]) -> list[Candidate]:
    """Stage 0 design points: every searched weight at the same fraction of its range, global IGG attention.

    The diagonal walk spans the weakest to the strongest guidance of the space, which is what the min-max ranges of
    evenness and divergence need.
    """

    def at(name: str, f: float) -> float | None:
        if name not in guidance.params:
            return None
        low, high = getattr(search, name)
        return low + f * (high - low)

    return [Candidate(w_cfg=at("w_cfg", f), w_igg=at("w_igg", f), window=None) for f in sorted(set(fractions))]
