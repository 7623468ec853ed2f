"""Property and reference tests for the guidance diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import sqrtm
from scipy.special import softmax
from scipy.stats import entropy
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from pipeline.core.metrics import (
    bit_pairs,
    bootstrap_fid,
    divergence,
    equilibrium_gap,
    evenness,
    frechet_distance,
    normal_interval,
    resample_counts,
    trial_mean,
    vocab_evenness,
)

shapes = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(2, 16))
seeds = st.integers(0, 2**31 - 1)


def randn(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=60, deadline=None)
@given(shapes, seeds)
def test_evenness_range_and_permutation_and_scale_invariance(shape, seed):
    x = randn(shape, seed)
    e = evenness(x)
    assert e.shape == (shape[0],)
    assert ((e >= 0) & (e <= 1)).all()
    perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(evenness(x[:, perm]), e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(evenness(x * 37.5), e, atol=1e-5, rtol=1e-5)


def test_evenness_reference_and_extremes():
    x = randn((2, 7, 5), seed=1)
    m = x.double().norm(dim=-1).numpy()
    want = [entropy(m[b] / m[b].sum()) / math.log(7) for b in range(2)]
    torch.testing.assert_close(evenness(x).double(), torch.tensor(want), atol=1e-6, rtol=1e-6)
    uniform = torch.ones(1, 9, 4)
    assert evenness(uniform).item() == pytest.approx(1.0, abs=1e-6)
    single = torch.zeros(1, 9, 4)
    single[0, 3, 1] = 5.0
    assert evenness(single).item() == pytest.approx(0.0, abs=1e-7)
    assert evenness(torch.zeros(2, 9, 4)).tolist() == [1.0, 1.0]  # no guidance
    assert evenness(randn((3, 1, 4), seed=2)).tolist() == [1.0, 1.0, 1.0]  # l = 1


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.floats(0.1, 50.0))
def test_vocab_evenness_range_and_reference(shape, seed, scale):
    z = randn(shape, seed, scale)
    e = vocab_evenness(z)
    assert ((e >= 0) & (e <= 1)).all()
    p = softmax(z.double().numpy(), axis=-1)
    want = (entropy(p, axis=-1) / math.log(shape[2])).mean(-1)
    np.testing.assert_allclose(e.numpy(), want, atol=1e-5)


def test_vocab_evenness_extremes():
    assert vocab_evenness(torch.full((2, 4, 16), 3.0)).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    peaked = torch.zeros(1, 3, 16)
    values = []
    for gap in (1.0, 10.0, 100.0):
        peaked[..., 0] = gap
        values.append(vocab_evenness(peaked).item())
    assert values[0] > values[1] > values[2] and values[2] < 1e-3


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.floats(0.1, 20.0))
def test_divergence_symmetric_bounded_and_reference(shape, seed, scale):
    p, q = randn(shape, seed, scale), randn(shape, seed + 1, scale)
    d = divergence(p, q)
    torch.testing.assert_close(d, divergence(q, p), atol=1e-6, rtol=1e-5)
    assert ((d >= 0) & (d <= 1)).all()
    assert divergence(p, p).abs().max() < 1e-6
    pn, qn = softmax(p.double().numpy(), -1), softmax(q.double().numpy(), -1)
    np.testing.assert_allclose(d.numpy(), jsd_bits(pn, qn).mean(-1), atol=1e-5)


def jsd_bits(pn, qn):
    """JSD along the last axis in bits, H(m) - (H(p) + H(q)) / 2 with m the mixture (scipy's jensenshannon takes a
    square root first and returns NaN where rounding makes its argument negative)."""
    return entropy((pn + qn) / 2, base=2, axis=-1) - (entropy(pn, base=2, axis=-1) + entropy(qn, base=2, axis=-1)) / 2


def test_divergence_disjoint_supports_is_one_bit():
    p = torch.full((1, 2, 4), -1e4)
    q = p.clone()
    p[..., 0] = 0.0
    q[..., 1] = 0.0
    assert divergence(p, q).item() == pytest.approx(1.0, abs=1e-6)


def product_over_codes(logits_BlV, bits):
    """The explicit distribution over the 2^bits codes of independent bits, (B, l, 2^bits) float64, code c's bit j
    being its binary digit j (the first most significant)."""
    p_Bld2 = softmax(logits_BlV.double().numpy().reshape(*logits_BlV.shape[:2], bits, 2), -1)
    codes = np.arange(2 ** bits)[:, None] >> np.arange(bits - 1, -1, -1) & 1    # (2^bits, bits)
    return np.prod(np.take_along_axis(p_Bld2[:, :, None], codes[None, None, :, :, None], -1)[..., 0], axis=-1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), seeds, st.floats(0.1, 10.0))
def test_bitwise_evenness_is_the_evenness_over_all_codes(B, l, bits, seed, scale):
    """On a bitwise backbone's logits, vocab_evenness of the bit pairs equals the Pielou evenness of the product
    distribution over the 2^bits codes (entropy / ln 2^bits, mean over tokens)."""
    z_BlV = randn((B, l, 2 * bits), seed, scale)
    codes_BlC = product_over_codes(z_BlV, bits)
    np.testing.assert_allclose(codes_BlC.sum(-1), 1.0, atol=1e-12)
    want = (entropy(codes_BlC, axis=-1) / math.log(2 ** bits)).mean(-1)
    np.testing.assert_allclose(vocab_evenness(bit_pairs(z_BlV, bits)).numpy(), want, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), seeds, st.floats(0.1, 10.0))
def test_bitwise_divergence_is_the_mean_per_bit_jsd(B, l, bits, seed, scale):
    """The bitwise divergence is the mean over bits of each bit's JSD (binary entropies); with one bit it is the
    token JSD over the two codes."""
    p_BlV, q_BlV = randn((B, l, 2 * bits), seed, scale), randn((B, l, 2 * bits), seed + 1, scale)
    pn = softmax(p_BlV.double().numpy().reshape(B, l * bits, 2), -1)
    qn = softmax(q_BlV.double().numpy().reshape(B, l * bits, 2), -1)
    got = divergence(bit_pairs(p_BlV, bits), bit_pairs(q_BlV, bits)).numpy()
    np.testing.assert_allclose(got, jsd_bits(pn, qn).mean(-1), atol=1e-5)
    if bits == 1:
        token = jsd_bits(product_over_codes(p_BlV, 1), product_over_codes(q_BlV, 1))
        np.testing.assert_allclose(got, token.mean(-1), atol=1e-5)


def test_bit_pairs_checks_the_width():
    with pytest.raises(ValueError, match="2·bits = 6, got 5"):
        bit_pairs(torch.zeros(1, 2, 5), 3)
    assert bit_pairs(torch.arange(8.0).view(1, 1, 8), 4)[0, 1].tolist() == [2.0, 3.0]   # bit 1's pair


def test_divergence_shape_mismatch():
    with pytest.raises(ValueError, match="q_BlV"):
        divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_trial_mean_skips_scale_zero():
    per_scale = [torch.tensor([100.0, 100.0]), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    assert trial_mean(per_scale).tolist() == [2.0, 4.0]
    assert trial_mean([torch.tensor([5.0])]).tolist() == [5.0]
    with pytest.raises(ValueError, match="per_scale"):
        trial_mean([])


def test_equilibrium_gap_is_range_free():
    e = torch.tensor([0.54, 0.47, 0.41])  # falling with the weight
    d = torch.tensor([0.04, 0.45, 0.47])  # rising with the weight
    torch.testing.assert_close(equilibrium_gap(e, d), (e - d).abs())
    assert equilibrium_gap(e, d).argmin().item() == 1
    with pytest.raises(ValueError, match="same shape"):
        equilibrium_gap(e, d[:2])


def features(n: int, f: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g) @ torch.randn(f, f, generator=g) * 0.3 + shift


def test_frechet_distance_equals_torch_fidelity_and_scipy():
    gen, ref = features(300, 12, 0, 0.2), features(500, 12, 1)
    s_gen, s_ref = fid_features_to_statistics(gen), fid_features_to_statistics(ref)
    expected = fid_statistics_to_metric(s_gen, s_ref, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(*(torch.from_numpy(s[k]) for s in (s_gen, s_ref) for k in ("mu", "sigma")))
    assert float(ours) == pytest.approx(expected, rel=1e-7)
    mu1, mu2, s1, s2 = s_gen["mu"], s_ref["mu"], s_gen["sigma"], s_ref["sigma"]
    by_scipy = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert float(ours) == pytest.approx(by_scipy, rel=1e-7)


def test_bootstrap_fid_of_unit_counts_is_the_fid_and_resamples_are_draws():
    gen, ref = features(200, 6, 2, 0.1), features(400, 6, 3)
    s_ref = fid_features_to_statistics(ref)
    mu, sigma = torch.from_numpy(s_ref["mu"]), torch.from_numpy(s_ref["sigma"])
    s_gen = fid_features_to_statistics(gen)
    point = fid_statistics_to_metric(s_gen, s_ref, verbose=False)["frechet_inception_distance"]
    ones = torch.ones(1, 200, dtype=torch.int64)
    assert float(bootstrap_fid(gen, mu, sigma, ones)[0]) == pytest.approx(point, rel=1e-6)
    counts = resample_counts(200, 5, seed=0)
    assert counts.shape == (5, 200) and (counts.sum(1) == 200).all() and (counts >= 0).all()
    assert torch.equal(counts, resample_counts(200, 5, seed=0)) and not torch.equal(counts, resample_counts(200, 5, 1))
    picked = torch.repeat_interleave(torch.arange(200), counts[0])  # resample 0 as explicit rows
    s_pick = fid_features_to_statistics(gen[picked])
    explicit = fid_statistics_to_metric(s_pick, s_ref, verbose=False)["frechet_inception_distance"]
    assert float(bootstrap_fid(gen, mu, sigma, counts)[0]) == pytest.approx(explicit, rel=1e-5)
    with pytest.raises(ValueError, match="columns"):
        bootstrap_fid(gen, mu, sigma, counts[:, :10])


def test_bootstrap_spread_matches_the_spread_between_seeds():
    """The interval's width is what FID moves by between independent draws of the generated set."""
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(99)) * 0.3

    def draw(seed: int) -> torch.Tensor:
        return torch.randn(400, 6, generator=torch.Generator().manual_seed(seed)) @ mix + 0.2

    s_ref = fid_features_to_statistics(torch.randn(2000, 6, generator=torch.Generator().manual_seed(5)) @ mix)
    mu, sigma = torch.from_numpy(s_ref["mu"]), torch.from_numpy(s_ref["sigma"])
    draws = [fid_statistics_to_metric(fid_features_to_statistics(draw(s)), s_ref, verbose=False)[
        "frechet_inception_distance"] for s in range(40)]
    se = float(bootstrap_fid(draw(1000), mu, sigma, resample_counts(400, 300, seed=0)).std())
    assert se == pytest.approx(float(np.std(draws)), rel=0.5)


def test_stratified_resamples_keep_each_condition_s_count():
    strata = torch.arange(90) * 5 % 9  # 9 conditions, 10 images each, interleaved as a sweep's labels
    counts = resample_counts(90, 50, seed=3, strata_N=strata)
    assert counts.shape == (50, 90) and (counts.sum(1) == 90).all()
    for h in range(9):  # every resample holds each condition's 10 images, drawn among that condition's only
        assert (counts[:, strata == h].sum(1) == 10).all()
    assert torch.equal(counts, resample_counts(90, 50, seed=3, strata_N=strata))
    assert not torch.equal(counts[:, strata == 0], torch.ones(50, 10, dtype=torch.int64))  # still resampled
    picks = torch.randint(90, (50, 90), generator=torch.Generator().manual_seed(3))  # None: the plain bootstrap
    plain = torch.zeros(50, 90, dtype=torch.int64).scatter_add_(1, picks, torch.ones_like(picks))
    assert torch.equal(resample_counts(90, 50, seed=3), plain)
    with pytest.raises(ValueError, match="one stratum per image"):
        resample_counts(90, 5, seed=0, strata_N=strata[:80])


def test_stratified_bootstrap_leaves_out_the_mix_of_conditions():
    """Images of fixed conditions (class means far apart, small noise around them; the reference spreads wider):
    the spread of FID between redraws of the noise is what the stratified bootstrap measures; the plain one also
    redraws the class mix."""
    means = torch.randn(4, 6, generator=torch.Generator().manual_seed(7)) * 3
    labels = torch.arange(400) % 4

    def draw(seed: int, n: int = 400, spread: float = 0.3) -> torch.Tensor:
        return means[torch.arange(n) % 4] + spread * torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))

    s_ref = fid_features_to_statistics(draw(10_000, 4000, 0.8))
    mu, sigma = torch.from_numpy(s_ref["mu"]), torch.from_numpy(s_ref["sigma"])
    draws = [fid_statistics_to_metric(fid_features_to_statistics(draw(s)), s_ref, verbose=False)[
        "frechet_inception_distance"] for s in range(40)]
    stratified = float(bootstrap_fid(draw(1000), mu, sigma, resample_counts(400, 300, 0, labels)).std())
    plain = float(bootstrap_fid(draw(1000), mu, sigma, resample_counts(400, 300, 0)).std())
    assert stratified == pytest.approx(float(np.std(draws)), rel=0.3)
    assert plain > 3 * stratified


def test_normal_interval():
    reps = torch.tensor([1.0, 2.0, 3.0, 4.0])
    low, high = normal_interval(10.0, reps, 0.95)
    assert (low + high) / 2 == pytest.approx(10.0)
    assert (high - low) / 2 == pytest.approx(1.959964 * float(reps.std()), 1e-5)
    with pytest.raises(ValueError, match="level"):
        normal_interval(1.0, reps, 1.0)
