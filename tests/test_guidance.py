"""guide() against a direct float64 reference of the equation; window semantics; memory; schedules; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.core.guidance import guide, schedule_ratio, window_attention


def reference_guide(cond, uncond, w_cfg, w_igg, ratio, hw=None, window=None):
    """The equation written out in float64 with an explicit l×l mask."""
    cond, uncond = cond.double(), uncond.double()
    delta = cond - uncond
    _, l, V = delta.shape
    out = uncond.clone()
    if w_cfg is not None:
        out = out + (1 + ratio * w_cfg) * delta
    if w_igg is not None:
        scores = delta @ delta.transpose(1, 2) / math.sqrt(V)
        if window is not None:
            w = hw[1]
            rows = torch.arange(l) // w
            cols = torch.arange(l) % w
            r = (window - 1) // 2
            near = ((rows[:, None] - rows[None]).abs() <= r) & ((cols[:, None] - cols[None]).abs() <= r)
            scores = scores.masked_fill(~near, float("-inf"))
        out = out + (1 + ratio * w_igg) * (torch.softmax(scores, -1) @ delta)
    return out


def logits(B, l, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, l, V, generator=g) * scale, torch.randn(B, l, V, generator=g) * scale


@pytest.mark.parametrize(
    ("w_cfg", "w_igg"), [(1.5, None), (None, 2.0), (1.5, 3.0), (0.0, 0.0), (None, None), (-0.5, 4.0)]
)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_global_matches_reference(w_cfg, w_igg, ratio):
    cond, uncond = logits(2, 12, 64, seed=1)
    got = guide(cond, uncond, w_cfg=w_cfg, w_igg=w_igg, ratio=ratio)
    want = reference_guide(cond, uncond, w_cfg, w_igg, ratio)
    assert got.dtype == torch.float32 and got.shape == cond.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("hw", "window"), [((3, 5), 3), ((4, 4), 5), ((6, 2), 3), ((5, 5), 1), ((1, 7), 3)])
def test_window_matches_reference_non_square(hw, window):
    l = hw[0] * hw[1]
    cond, uncond = logits(3, l, 32, seed=2)
    got = guide(cond, uncond, w_cfg=1.0, w_igg=2.5, ratio=0.7, hw=hw, window=window)
    want = reference_guide(cond, uncond, 1.0, 2.5, 0.7, hw=hw, window=window)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_large_vocab_and_single_token():
    cond, uncond = logits(2, 9, 4096, seed=3, scale=1.0)
    want = reference_guide(cond, uncond, 2.0, 1.0, 0.5)
    torch.testing.assert_close(guide(cond, uncond, w_cfg=2.0, w_igg=1.0, ratio=0.5).double(), want, rtol=1e-5,
                               atol=1e-4)
    cond1, uncond1 = logits(4, 1, 4096, seed=4)
    # l = 1: attention over one token is the identity, so IGG adds (1 + r·w′)·Δ.
    got = guide(cond1, uncond1, w_cfg=None, w_igg=3.0, ratio=1.0, hw=(1, 1), window=1)
    torch.testing.assert_close(got, uncond1 + 4.0 * (cond1 - uncond1))


def test_window_one_is_identity_attention():
    cond, uncond = logits(2, 20, 16, seed=5)
    delta = cond - uncond
    torch.testing.assert_close(window_attention(delta, (4, 5), 1), delta)


def test_window_covering_map_equals_global():
    cond, uncond = logits(2, 4 * 6, 24, seed=6)
    windowed = guide(cond, uncond, w_cfg=0.5, w_igg=2.0, ratio=1.0, hw=(4, 6), window=11)
    glob = guide(cond, uncond, w_cfg=0.5, w_igg=2.0, ratio=1.0)
    torch.testing.assert_close(windowed, glob, rtol=1e-5, atol=1e-5)


def test_cfg_only_is_var_cfg():
    cond, uncond = logits(2, 10, 30, seed=7)
    t = 1.5 * 0.4  # VAR: t = cfg · k/(K−1); logits = (1+t)·cond − t·uncond
    torch.testing.assert_close(
        guide(cond, uncond, w_cfg=1.5, w_igg=None, ratio=0.4), (1 + t) * cond - t * uncond, rtol=1e-5, atol=1e-5
    )


def test_half_precision_inputs_compute_in_float32():
    cond, uncond = logits(2, 16, 64, seed=8)
    got = guide(cond.half(), uncond.half(), w_cfg=1.0, w_igg=1.0, ratio=1.0, hw=(4, 4), window=3)
    want = reference_guide(cond.half(), uncond.half(), 1.0, 1.0, 1.0, hw=(4, 4), window=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_windowed_memory_is_not_quadratic():
    side, V, window = 32, 8, 3
    l = side * side
    cond, uncond = logits(1, l, V, seed=9)
    with LargestTensor() as windowed:
        guide(cond, uncond, w_cfg=None, w_igg=1.0, ratio=1.0, hw=(side, side), window=window)
    with LargestTensor() as naive:
        reference_guide(cond, uncond, None, 1.0, 1.0, hw=(side, side), window=window)
    # Largest intermediate: the padded map or the l·s² score stack, never the l×l matrix.
    assert windowed.largest <= (side + window) ** 2 * max(V, window * window)
    assert windowed.largest < l * l // 8
    assert naive.largest >= l * l  # the instrument does see an l×l matrix where one is built


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"window": 2, "hw": (3, 3)}, "window"),
        ({"window": 0, "hw": (3, 3)}, "window"),
        ({"window": -3, "hw": (3, 3)}, "window"),
        ({"window": 3}, "hw"),
        ({"hw": (2, 2)}, "hw"),
        ({"w_igg": float("nan")}, "w_igg"),
        ({"w_cfg": float("inf")}, "w_cfg"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, needle):
    cond, uncond = logits(1, 9, 8, seed=10)
    args = {"w_cfg": 1.0, "w_igg": 1.0, "ratio": 1.0, **kwargs}
    with pytest.raises(ValueError, match=needle):
        guide(cond, uncond, **args)


def test_shape_mismatch_is_refused():
    cond, _ = logits(1, 9, 8, seed=11)
    with pytest.raises(ValueError, match="uncond_BlV"):
        guide(cond, cond[:, :4], w_cfg=1.0, w_igg=None, ratio=1.0)


def test_schedules():
    assert [schedule_ratio("linear", k, 5) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [schedule_ratio("constant", k, 3) for k in range(3)] == [1.0, 1.0, 1.0]
    got = [schedule_ratio("interval", k, 5, start=1, end=4) for k in range(5)]
    assert got == [None, 0.25, 0.5, 0.75, None]
    got = [schedule_ratio("constant_interval", k, 5, start=1, end=4) for k in range(5)]
    assert got == [None, 1.0, 1.0, 1.0, None]
    assert [schedule_ratio("constant_interval", k, 3, start=2, end=None) for k in range(3)] == [None, None, 1.0]
    assert schedule_ratio("linear", 0, 1) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        schedule_ratio("cosine", 0, 3)
    with pytest.raises(ValueError, match="k=3"):
        schedule_ratio("linear", 3, 3)
    for start, end in ((2, 2), (2, 1), (3, 0)):   # empty or reversed: no scale guided (Switti's on >= off)
        assert [schedule_ratio("interval", k, 3, start=start, end=end) for k in range(3)] == [None] * 3
    for start, end in ((4, None), (0, 4), (-1, 2)):
        with pytest.raises(ValueError, match=r"interval .* must lie in 0\.\.K=3"):
            schedule_ratio("interval", 0, 3, start=start, end=end)


def test_contract_paths_reexport_core():
    """The design's contract paths (pipeline.guidance, .metrics, .sampling) are the core modules' functions."""
    import importlib

    for name, attrs in {"guidance": ["guide", "KINDS"], "metrics": ["evenness", "vocab_evenness", "divergence"],
                        "sampling": ["sample"]}.items():
        contract, core = importlib.import_module(f"pipeline.{name}"), importlib.import_module(f"pipeline.core.{name}")
        for attr in attrs:
            assert getattr(contract, attr) is getattr(core, attr), f"pipeline.{name}.{attr}"
