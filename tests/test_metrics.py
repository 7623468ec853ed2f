"""Property and reference tests for the guidance diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from scipy.stats import entropy

from pipeline.metrics import divergence, equilibrium_gap, evenness, min_max_scale, trial_mean, vocab_evenness

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
    want = (jensenshannon(pn, qn, axis=-1, base=2) ** 2).mean(-1)
    np.testing.assert_allclose(d.numpy(), want, atol=1e-5)


def test_divergence_disjoint_supports_is_one_bit():
    p = torch.full((1, 2, 4), -1e4)
    q = p.clone()
    p[..., 0] = 0.0
    q[..., 1] = 0.0
    assert divergence(p, q).item() == pytest.approx(1.0, abs=1e-6)


def test_divergence_shape_mismatch():
    with pytest.raises(ValueError, match="q_BlV"):
        divergence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_trial_mean_skips_scale_zero():
    per_scale = [torch.tensor([100.0, 100.0]), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    assert trial_mean(per_scale).tolist() == [2.0, 4.0]
    assert trial_mean([torch.tensor([5.0])]).tolist() == [5.0]
    with pytest.raises(ValueError, match="per_scale"):
        trial_mean([])


def test_equilibrium_gap_scaling_keeps_direction():
    e = torch.tensor([0.54, 0.47, 0.41])  # falling with the weight
    d = torch.tensor([0.04, 0.25, 0.47])  # rising with the weight
    gap = equilibrium_gap(e, d, (0.41, 0.54), (0.04, 0.47))
    se, sd = min_max_scale(e, (0.41, 0.54)), min_max_scale(d, (0.04, 0.47))
    assert se[0] > se[1] > se[2] and sd[0] < sd[1] < sd[2]
    torch.testing.assert_close(gap, (se - sd).abs())
    assert gap.argmin().item() == 1
    with pytest.raises(ValueError, match="calibration range"):
        equilibrium_gap(e, d, (0.5, 0.5), (0.0, 1.0))
