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

Bitwise backbones (Infinity): a token's logits are a pair per bit, (B, l, 2·d), and its d bits are drawn
independently, so its distribution over the 2^d codes is the product of d two-way softmaxes. :func:`bit_pairs` views
the logits as (B, l·d, 2); on that view :func:`vocab_evenness` is exactly the Pielou evenness over the 2^d codes (the
entropy of a product is the sum of its factors', ln 2^d = d·ln 2, so their ratio averaged over tokens is the mean
binary entropy over bits, in units of ln 2), and :func:`divergence` is the mean per-bit JSD. The JSD of two product
distributions is not the sum of its factors' (the mixture of two products is no product), so the bitwise divergence
is our definition, not the token JSD: it is the token JSD for d = 1, in [0, 1] bits, and 0 only when every bit's
distribution agrees. A softmax over all 2·d logits, which no draw uses, is never taken.

The default proxy pairs ``vocab_evenness(guided)`` with ``divergence(guided, uncond)`` and looks for their
crossing, :func:`equilibrium_gap`, in natural units (no scaling, so the pick does not depend on the search range).
Both evenness kinds are logged. The second half of the module is FID from statistics and its bootstrap noise.

All functions are pure: tensors in, tensors out; the diagnostics give float32 results of shape (B,).
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


def bit_pairs(logits_BlV: Tensor, bits: int) -> Tensor:
    """A bitwise backbone's logits (B, l, 2·bits), a pair per bit in order, as (B, l·bits, 2): one two-way
    distribution per bit, the view its draws and its diagnostics take (module docstring)."""
    _check_BlV("logits_BlV", logits_BlV)
    B, l, V = logits_BlV.shape
    if bits < 1 or 2 * bits != V:
        raise ValueError(f"bitwise logits need V = 2·bits = {2 * bits}, got {V}")
    return logits_BlV.reshape(B, l * bits, 2)


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


def equilibrium_gap(e: Tensor, d: Tensor) -> Tensor:
    """|E − D|: the distance between evenness and divergence, both in their natural units.

    Evenness (:func:`vocab_evenness`, a normalised entropy) and divergence (:func:`divergence`, a JSD in bits) both
    live on [0, 1] with fixed meanings of 0 and 1 (one code / uniform; identical / disjoint predictions), so the gap
    needs no scaling: it depends on the backbone and the guidance only, never on the search range or on which
    design points were sampled. (An earlier min-max scaling over the design points moved the crossing with the
    range: the same backbone gave w′ ≈ 2.5 on [0, 6] and ≈ 4.8 on [0, 12].)

    Args:
        e: evenness, any shape (trial level: (B,) or a scalar).
        d: divergence, same shape as ``e``.

    Returns:
        Tensor of the shape of ``e``, float32, in [0, 1].
    """
    if e.shape != d.shape:
        raise ValueError(f"e {tuple(e.shape)} and d {tuple(d.shape)} must have the same shape")
    return (e.float() - d.float()).abs()


# ------------------------------------------------------------------------------------- FID and its noise
#
# FID of generated features X (N, F) against reference statistics (μ_r, Σ_r):
#     FID = ‖μ − μ_r‖² + tr Σ + tr Σ_r − 2 tr (Σ_r^½ Σ Σ_r^½)^½,
# with μ, Σ the mean and unbiased covariance of X (as torch-fidelity's np.cov); tr (Σ_r^½ Σ Σ_r^½)^½ equals
# torch-fidelity's tr sqrtm(Σ Σ_r) (similar matrices) and is the sum of the square roots of the eigenvalues of a
# symmetric PSD matrix. Its noise is the bootstrap over the generated images: a resample is a row of counts
# c (N,) summing to N; two candidates sampled with the same labels and sampler seeds (common random numbers) are
# resampled with the same counts, so the bootstrap of their FID difference keeps the pairing. A sweep fixes the
# conditions of its images (every candidate samples the same classes or prompts), so the bootstrap is stratified by
# condition: only the sampler's noise is redrawn. Over all images it would also redraw the class mix, which on the
# embedded backbone doubles the spread against what FID moves by between sampler seeds (docs/BENCHMARKS.md).


def psd_sqrt(sigma_FF: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (negative eigenvalues from rounding clipped to 0); float64 (F, F)."""
    eigval_F, eigvec_FF = torch.linalg.eigh(sigma_FF.double())
    return (eigvec_FF * eigval_F.clamp_min(0).sqrt()) @ eigvec_FF.T


def frechet_distance(mu_F: Tensor, sigma_FF: Tensor, mu_ref_F: Tensor, sigma_ref_FF: Tensor) -> Tensor:
    """The Fréchet distance of two Gaussians (FID of statistics); float64 scalar."""
    return bootstrap_fid_from_stats(mu_F[None], sigma_FF[None], mu_ref_F, sigma_ref_FF)[0]


def bootstrap_fid_from_stats(mu_RF: Tensor, sigma_RFF: Tensor, mu_ref_F: Tensor, sigma_ref_FF: Tensor) -> Tensor:
    """Fréchet distance of R sets of statistics (μ_r, Σ_r) to one reference; float64 (R,)."""
    root_FF = psd_sqrt(sigma_ref_FF)
    mu_ref_F = mu_ref_F.double().to(mu_RF.device)
    root_FF = root_FF.to(mu_RF.device)
    inner_RFF = root_FF @ sigma_RFF.double() @ root_FF
    eig_RF = torch.linalg.eigvalsh(0.5 * (inner_RFF + inner_RFF.transpose(1, 2))).clamp_min(0)
    diff_RF = mu_RF.double() - mu_ref_F
    trace_ref = torch.diagonal(sigma_ref_FF.double()).sum().to(mu_RF.device)
    trace_RF = torch.diagonal(sigma_RFF.double(), dim1=1, dim2=2).sum(-1)
    return (diff_RF * diff_RF).sum(-1) + trace_RF + trace_ref - 2 * eig_RF.sqrt().sum(-1)


def resample_counts(num_images: int, replicates: int, seed: int, strata_N: Tensor | None = None) -> Tensor:
    """Bootstrap resamples of N images as counts: (R, N) int64, each row summing to N.

    Args:
        strata_N: (N,) int64 stratum of each image (its condition: class label or prompt index), or None for one
            stratum. Stratified, a resample draws as many images from each stratum as it holds, with replacement
            inside the stratum: the conditions of a sweep's images are fixed by its design (every candidate samples
            the same ones), so only the sampler's noise is resampled, not the mixture of conditions.
    """
    if num_images < 2 or replicates < 1:
        raise ValueError(f"a bootstrap needs >= 2 images and >= 1 replicate, got {num_images} and {replicates}")
    generator = torch.Generator().manual_seed(seed)
    if strata_N is None:
        picks_RN = torch.randint(num_images, (replicates, num_images), generator=generator)
    else:
        if strata_N.shape != (num_images,):
            raise ValueError(f"strata_N has shape {tuple(strata_N.shape)}; give one stratum per image ({num_images},)")
        members = [torch.nonzero(strata_N == h).flatten() for h in torch.unique(strata_N)]
        picks_RN = torch.cat([m[torch.randint(len(m), (replicates, len(m)), generator=generator)] for m in members],
                             dim=1)
    counts_RN = torch.zeros(replicates, num_images, dtype=torch.int64)
    return counts_RN.scatter_add_(1, picks_RN, torch.ones_like(picks_RN))


def bootstrap_fid(features_NF: Tensor, mu_ref_F: Tensor, sigma_ref_FF: Tensor, counts_RN: Tensor) -> Tensor:
    """FID of each bootstrap resample of the generated features; float64 (R,).

    Args:
        features_NF: (N, F) generated features.
        mu_ref_F, sigma_ref_FF: reference statistics.
        counts_RN: (R, N) resample counts (:func:`resample_counts`); the same counts for two candidates with common
            random numbers give the paired bootstrap of their difference.
    """
    N = features_NF.shape[0]
    if counts_RN.shape[1] != N:
        raise ValueError(f"counts_RN has {counts_RN.shape[1]} columns for {N} images; draw them for N images")
    centre_F = features_NF.double().mean(0)
    x_NF = (features_NF.double() - centre_F).float()  # centred: float32 accumulation loses nothing that matters
    w_RN = counts_RN.to(x_NF.device, torch.float32)
    m_RF = (w_RN @ x_NF) / N
    second_RFF = torch.einsum("rn,nf,ng->rfg", w_RN, x_NF, x_NF).double()
    sigma_RFF = (second_RFF - N * m_RF.double()[:, :, None] * m_RF.double()[:, None, :]) / (N - 1)
    return bootstrap_fid_from_stats(m_RF.double() + centre_F, sigma_RFF, mu_ref_F, sigma_ref_FF)


def normal_interval(estimate: float, replicates_R: Tensor, level: float) -> tuple[float, float]:
    """estimate ± z·se at `level` (e.g. 0.95, z = 1.96), se the standard deviation of the bootstrap replicates.

    The interval is centred on the estimate on purpose: a resampled FID is biased upwards (duplicated images shrink
    the covariance) by more than its spread, so percentile intervals would miss the estimate; the spread alone is
    what moves FID between sampler seeds (docs/BENCHMARKS.md compares the two).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie in (0, 1), e.g. 0.95")
    if replicates_R.numel() < 2:
        raise ValueError("an interval needs at least 2 bootstrap replicates")
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    se = float(replicates_R.double().std())
    return estimate - z * se, estimate + z * se
