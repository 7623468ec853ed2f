"""Guidance diagnostics: evenness and divergence, their trial-level aggregate and the equilibrium gap.

The IGG paper ("Not All Tokens are Guided Equal", arXiv 2509.23876) reads guidance through two diagnostics, an
evenness (Pielou's evenness index, PEI) and a divergence (Jensen–Shannon, JSD), and finds the best guidance weight
where their scaled values meet. The paper's Section 4 formulas were not available to us; the definitions below are
this project's reading of them, kept in this one module:

- :func:`evenness` — Pielou evenness over the *tokens* of the per-token L2 magnitude of the applied nudge
  (``guided − uncond``): low when guidance is concentrated on few tokens (the paper's heat maps). For pure CFG or
  pure IGG the nudge at a scale is a scalar multiple of one tensor, so this evenness depends on the weight only
  through earlier samples (a prototype measured it moving 0.0018 over w = 0…8): a diagnostic, not a proxy.
- :func:`vocab_evenness` — Pielou evenness over the *vocabulary* of each token's next-token distribution,
  H(softmax z)/ln V, averaged over tokens: how much diversity guidance leaves (prototype: 0.541 → 0.410 over w = 0…8).
- :func:`divergence` — JSD (log base 2, in [0, 1] bits) between two logit sets, mean over tokens; the proxy uses
  guided vs unconditional logits by default (prototype: 0.042 → 0.470 bits over w = 0…8).

The default proxy pairs ``vocab_evenness(guided)`` with ``divergence(guided, uncond)``: their scaled crossing sat
near the FID optimum in the prototype (w ≈ 4 vs 3 for CFG, w′ ≈ 3 vs 3 for IGG). Both evenness kinds are logged.

All functions are pure: tensors in, tensors out, float32 results of shape (B,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

LN2 = math.log(2.0)


def _check_BlV(name: str, x: Tensor) -> None:
    if x.dim() != 3 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must be a non-empty (B, l, V) tensor, got shape {tuple(x.shape)}")


def _pielou(p_BN: Tensor) -> Tensor:
    """Pielou evenness −Σ p ln p / ln N of distributions along the last axis (N ≥ 2); (B,)."""
    return -torch.special.xlogy(p_BN, p_BN).sum(-1) / math.log(p_BN.shape[-1])


def evenness(nudge_BlV: Tensor) -> Tensor:
    """Pielou evenness over tokens of the per-token guidance magnitude.

    m_i = ‖nudge_i‖₂, p_i = m_i / Σ_j m_j, E = −Σ p_i ln p_i / ln l; E = 1 when l = 1 or the nudge is zero.

    Args:
        nudge_BlV: applied guidance ``guided − uncond``, (B, l, V).

    Returns:
        (B,) float32 in [0, 1]; low means guidance concentrated on few tokens.
    """
    _check_BlV("nudge_BlV", nudge_BlV)
    m_Bl = nudge_BlV.float().norm(dim=-1)
    B, l = m_Bl.shape
    if l == 1:
        return torch.ones(B, device=m_Bl.device)
    total_B = m_Bl.sum(-1)
    p_Bl = m_Bl / total_B.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return torch.where(total_B > 0, _pielou(p_Bl).clamp(0.0, 1.0), torch.ones_like(total_B))


def vocab_evenness(logits_BlV: Tensor) -> Tensor:
    """Pielou evenness over the vocabulary of each token's distribution, mean over tokens.

    Args:
        logits_BlV: (B, l, V) logits.

    Returns:
        (B,) float32 in [0, 1]: 1 for uniform predictions, → 0 as one code dominates.
    """
    _check_BlV("logits_BlV", logits_BlV)
    B, _, V = logits_BlV.shape
    if V == 1:
        return torch.ones(B, device=logits_BlV.device)
    logp_BlV = torch.log_softmax(logits_BlV.float(), dim=-1)
    entropy_Bl = -(logp_BlV.exp() * logp_BlV).sum(-1)
    return (entropy_Bl / math.log(V)).clamp(0.0, 1.0).mean(-1)


def divergence(p_BlV: Tensor, q_BlV: Tensor) -> Tensor:
    """Jensen–Shannon divergence of softmax(p) and softmax(q), log base 2, mean over tokens.

    Args:
        p_BlV: (B, l, V) logits.
        q_BlV: (B, l, V) logits.

    Returns:
        (B,) float32 in [0, 1] bits.
    """
    _check_BlV("p_BlV", p_BlV)
    if p_BlV.shape != q_BlV.shape:
        raise ValueError(f"p_BlV {tuple(p_BlV.shape)} and q_BlV {tuple(q_BlV.shape)} must have the same shape")
    logp_BlV = torch.log_softmax(p_BlV.float(), dim=-1)
    logq_BlV = torch.log_softmax(q_BlV.float(), dim=-1)
    logm_BlV = torch.logaddexp(logp_BlV, logq_BlV) - LN2
    kl_pm_Bl = (logp_BlV.exp() * (logp_BlV - logm_BlV)).sum(-1)
    kl_qm_Bl = (logq_BlV.exp() * (logq_BlV - logm_BlV)).sum(-1)
    jsd_Bl = 0.5 * (kl_pm_Bl + kl_qm_Bl) / LN2
    return jsd_Bl.clamp(0.0, 1.0).mean(-1)


def trial_mean(per_scale: Sequence[Tensor]) -> Tensor:
    """Trial-level value of a per-scale diagnostic: the mean over scales 1…K−1 (scale 0 has one token).

    Args:
        per_scale: K tensors of shape (B,), one per scale in order.

    Returns:
        (B,) float32; with K = 1 the value of the only scale.
    """
    if len(per_scale) == 0:
        raise ValueError("per_scale is empty; pass one (B,) tensor per scale")
    used = per_scale[1:] if len(per_scale) > 1 else per_scale
    return torch.stack([v.float() for v in used]).mean(0)


def min_max_scale(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    """(x − lo) / (hi − lo) with (lo, hi) from the calibration set; values outside it fall outside [0, 1]."""
    lo, hi = value_range
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(
            f"calibration range ({lo}, {hi}) must be finite with max > min; calibrate on design points that differ"
        )
    return (x.float() - lo) / (hi - lo)


def equilibrium_gap(
    e: Tensor, d: Tensor, e_range: tuple[float, float], d_range: tuple[float, float]
) -> Tensor:
    """|Ê − D̂|: distance between min-max scaled evenness and divergence (each by its calibration range).

    Args:
        e: evenness, any shape (trial level: (B,) or a scalar).
        d: divergence, same shape as ``e``.
        e_range: (min, max) of evenness over the calibration set.
        d_range: (min, max) of divergence over the calibration set.

    Returns:
        Tensor of the shape of ``e``, float32, ≥ 0.
    """
    if e.shape != d.shape:
        raise ValueError(f"e {tuple(e.shape)} and d {tuple(d.shape)} must have the same shape")
    return (min_max_scale(e, e_range) - min_max_scale(d, d_range)).abs()
