"""A smoothed FID surface for one guidance kind: the Gaussian-process posterior mean of log FID at its trials.

At ``refine.num_images`` one FID is noisy (16.7 % relative std between sampler seeds at 512 images on the embedded
backbone; see docs/BENCHMARKS.md), so the lowest FID observed is largely the luckiest draw. The refinement stage
ranks a kind's trials by this posterior mean instead: a trial's value is pulled towards its neighbours' in
proportion to its noise, so a lone lucky draw among poor neighbours ranks below a region that is consistently good.
The noise terms are independent: each candidate draws its own images (:func:`tuners.scoring.candidate_seed`).

Model, per kind::

    log FID(x) = m + f(x) + e,   f ~ GP(0, s² k),   e_i ~ N(0, v_i),
    k(x, x') = exp(-|u - u'|² / (2 l²)) · (kinship if the windows or intervals differ else 1),   u = log(1 + w)

- ``v_i = (fid_se_i / fid_i)²``: the bootstrap std of the trial's FID, carried to log FID (delta method);
- ``m``: the mean of the observations; ``s²``: their variance less the mean noise variance, at least that mean
  (the data say how much of the spread is signal, never less than half of it);
- ``l`` (``refine.lengthscale``, in log(1 + w) units) and ``kinship`` (``refine.window_kinship``, the correlation of
  two windows, or two guidance intervals, at the same weights) are the only fixed choices. The kernel is a product
  of an RBF and an exchangeable categorical kernel, so it is positive semi-definite for kinship in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_weights(weights_Nd: Tensor) -> Tensor:
    """Coordinates of the kernel: log(1 + w) per weight (guidance weights act multiplicatively). (N, d) -> (N, d)."""
    return torch.log1p(weights_Nd.clamp_min(0.0))


def posterior_mean(u_Nd: Tensor, window_N: Tensor, y_N: Tensor, var_N: Tensor, *, lengthscale: float,
                   kinship: float) -> Tensor:
    """Posterior mean of the GP at the N observed points.

    Args:
        u_Nd: kernel coordinates of the trials, (N, d), e.g. :func:`log_weights`.
        window_N: an integer code of each trial's window and interval (equal codes: the same), (N,).
        y_N: observations (log FID), (N,).
        var_N: their noise variances, (N,), > 0.
        lengthscale: RBF length scale in the units of ``u_Nd``, > 0.
        kinship: kernel factor between different windows, in [0, 1].

    Returns:
        (N,) posterior mean of the noise-free surface at each trial, in the units of ``y_N``.
    """
    if not (lengthscale > 0 and 0.0 <= kinship <= 1.0):
        raise ValueError(f"lengthscale must be > 0 and kinship in [0, 1], got {lengthscale}, {kinship}")
    u, y, v = u_Nd.double(), y_N.double(), var_N.double()
    mean = y.mean()
    noise = v.mean()
    signal = torch.clamp(y.var(unbiased=False) - noise, min=noise) if len(y) > 1 else noise
    K_NN = signal * torch.exp(-torch.cdist(u, u).square() / (2 * lengthscale ** 2))
    K_NN = K_NN * torch.where(window_N[:, None] == window_N[None, :], 1.0, kinship).double()
    alpha_N = torch.linalg.solve(K_NN + torch.diag(v), y - mean)
    return (mean + K_NN @ alpha_N).to(y_N.dtype)
