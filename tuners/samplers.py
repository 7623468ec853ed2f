"""Seeded Optuna samplers for the proxy stage."""

from __future__ import annotations

import optuna

from pipeline.config.schema import SAMPLERS


def make_sampler(name: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """TPE (constant liar, so parallel asks spread out), GP, or random search; all seeded.

    Args:
        name: one of ``tpe``, ``gp``, ``random``.
        seed: sampler seed.
        n_startup_trials: random trials before TPE/GP model the objective.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler={name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
