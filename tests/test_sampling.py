"""The guided scale-wise sampler: seeds, filtering, guidance placement, signals, bad inputs."""


import pytest
import torch

from pipeline.backbones.var import VARConfig, random_var
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.core.guidance import guide
from pipeline.core.metrics import divergence, evenness, vocab_evenness
from pipeline.core.sampling import sample, sample_top_k_top_p

PN = (1, 2, 3, 4)
BB = random_var(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PN),
                VARConfig(vocab_size=64, z_channels=8, depth=2, embed_dim=64, num_heads=2, num_classes=10,
                          patch_nums=PN), seed=0)
LABELS = [1, 5, 9]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)) and torch.equal(a.images, b.images)


def test_result_shapes_and_ranges():
    r = sample(BB, LABELS, w_cfg=1.5, w_igg=None, seed=0)
    assert r.images.shape == (3, 3, 8, 8) and r.images.dtype == torch.float32 and r.images.device.type == "cpu"
    assert r.images.min() >= 0 and r.images.max() <= 1
    assert [tuple(i.shape) for i in r.indices] == [(3, pn * pn) for pn in PN]
    assert all(i.dtype == torch.int64 and i.min() >= 0 and i.max() < 64 for i in r.indices)
    assert len(r.signals) == len(PN)
    for s, pn in zip(r.signals, PN, strict=True):
        assert s.magnitude_Bhw.shape == (3, pn, pn)
        for v in (s.token_evenness, s.vocab_evenness, s.div_uncond, s.div_cond):
            assert v.shape == (3,) and v.dtype == torch.float32 and ((v >= 0) & (v <= 1)).all()


def test_seeds():
    kw = dict(w_cfg=2.0, w_igg=1.0)
    assert same(sample(BB, LABELS, seed=7, **kw), sample(BB, LABELS, seed=7, **kw))
    a, b = sample(BB, LABELS, seed=7, **kw), sample(BB, LABELS, seed=8, **kw)
    assert not all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert not torch.equal(a.images, b.images)


@pytest.mark.parametrize("w_cfg, w_igg", [(3.0, None), (None, 4.0), (2.0, 2.0)])
def test_an_image_depends_only_on_its_own_label_and_noise(w_cfg, w_igg, monkeypatch):
    """Changing one image's label changes no other image at the same seed (its noise draws are its own), and one
    noise for every image with one label gives one image whatever its place in the batch."""
    labels = torch.tensor([1, 5, 9, 2, 7, 0])
    a = sample(BB, labels, w_cfg=w_cfg, w_igg=w_igg, seed=3, with_signals=False).images
    for i in (0, len(labels) - 1):
        other = labels.clone()
        other[i] = (other[i] + 3) % 10
        b = sample(BB, other, w_cfg=w_cfg, w_igg=w_igg, seed=3, with_signals=False).images
        keep = torch.arange(len(labels)) != i
        assert torch.equal(a[keep], b[keep]) and not torch.equal(a[i], b[i])

    def one_noise(logits_BlV, *, top_k=0, top_p=0.0, generator=None):
        e_lV = torch.empty(logits_BlV.shape[1:]).exponential_(generator=generator)
        return (logits_BlV.softmax(-1) / e_lV).argmax(-1)

    monkeypatch.setattr("pipeline.core.sampling.sample_top_k_top_p", one_noise)
    images = sample(BB, [4] * 5, w_cfg=w_cfg, w_igg=w_igg, seed=3, with_signals=False).images
    assert torch.equal(images, images[:1].expand_as(images))


def test_top_k_1_is_greedy_and_deterministic_without_seed():
    steps = []
    a = sample(BB, LABELS, w_cfg=3.0, w_igg=2.0, window=3, top_k=1, callback=steps.append)
    torch.manual_seed(123)
    assert same(a, sample(BB, LABELS, w_cfg=3.0, w_igg=2.0, window=3, top_k=1))
    for step in steps:
        assert torch.equal(step.idx, step.guided.argmax(-1))


def test_cfg_tokens_follow_vars_own_combination():
    """VAR combines (1 + t)·cond − t·uncond with t = cfg·k/(K−1); with top_k=1 that is the token chosen."""
    steps = []
    sample(BB, LABELS, w_cfg=2.5, w_igg=None, top_k=1, callback=steps.append)
    for step in steps:
        t = 2.5 * step.k / (len(PN) - 1)
        assert torch.equal(step.idx, ((1 + t) * step.cond - t * step.uncond).argmax(-1))


@pytest.mark.parametrize(("w_cfg", "w_igg", "window"), [(2.0, None, None), (None, 3.0, None), (1.0, 2.0, 3)])
def test_guidance_and_signals_per_scale(w_cfg, w_igg, window):
    steps = []
    r = sample(BB, LABELS, w_cfg=w_cfg, w_igg=w_igg, window=window, seed=1, callback=steps.append)
    assert [s.k for s in steps] == list(range(len(PN)))
    for step, sig in zip(steps, r.signals, strict=True):
        assert step.ratio == step.k / (len(PN) - 1)
        expected = guide(step.cond, step.uncond, w_cfg=w_cfg, w_igg=w_igg, ratio=step.ratio,
                         hw=(step.pn, step.pn), window=window)
        torch.testing.assert_close(step.guided, expected, rtol=0, atol=0)
        assert torch.equal(step.idx, r.indices[step.k]) and step.signals is sig
        nudge = step.guided - step.uncond
        torch.testing.assert_close(sig.token_evenness, evenness(nudge))
        torch.testing.assert_close(sig.vocab_evenness, vocab_evenness(step.guided))
        torch.testing.assert_close(sig.div_uncond, divergence(step.guided, step.uncond))
        torch.testing.assert_close(sig.div_cond, divergence(step.guided, step.cond))
        torch.testing.assert_close(sig.magnitude_Bhw.flatten(1), nudge.norm(dim=-1))


def test_without_signals_same_samples():
    steps = []
    plain = sample(BB, LABELS, w_cfg=2.0, w_igg=1.0, seed=5, with_signals=False, callback=steps.append)
    assert plain.signals == [] and all(step.signals is None for step in steps)
    assert same(plain, sample(BB, LABELS, w_cfg=2.0, w_igg=1.0, seed=5))


def test_interval_schedule_leaves_outer_scales_unguided():
    steps = []
    sample(BB, LABELS, w_cfg=4.0, w_igg=None, schedule="interval", interval_start=1, interval_end=3, seed=0,
           callback=steps.append)
    assert [s.ratio for s in steps] == [None, 1 / 3, 2 / 3, None]
    for step in (steps[0], steps[3]):
        torch.testing.assert_close(step.guided, step.cond, rtol=0, atol=0)
        assert step.signals.div_cond.abs().max() < 1e-6


def test_top_k_top_p_filtering():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 16, generator=gen)
    before = logits.clone()
    draws = torch.stack([sample_top_k_top_p(logits, top_k=3, generator=gen) for _ in range(20)])
    top3 = logits.topk(3, dim=-1).indices
    assert (draws[..., None] == top3).any(-1).all()
    assert torch.equal(logits, before)                                             # input untouched
    assert torch.equal(sample_top_k_top_p(logits, top_k=1), logits.argmax(-1))

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    nucleus = probs.log().expand(1, 2000, 4)
    for top_p, allowed in ((0.7, {0, 1}), (0.8, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        seen = set(sample_top_k_top_p(nucleus, top_p=top_p, generator=gen).unique().tolist())
        assert seen == allowed, top_p
    for top_k, top_p, allowed in ((2, 0.99, {0, 1}), (2, 0.5, {0}), (3, 0.9, {0, 1, 2})):
        seen = set(sample_top_k_top_p(nucleus, top_k=top_k, top_p=top_p, generator=gen).unique().tolist())
        assert seen == allowed, (top_k, top_p)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"labels": [0, 10]}, "labels must lie in 0..9"),
    ({"labels": [-1]}, "labels must lie in 0..9"),
    ({"labels": []}, "labels is empty"),
    ({"labels": [1.5]}, "labels must be integer class ids"),
    ({"top_k": -1}, "top_k=-1"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"top_p": 1.5}, r"top_p=1\.5"),
    ({"top_p": -0.1}, r"top_p=-0\.1"),
    ({"window": 2}, "window=2"),
    ({"schedule": "cosine"}, "schedule='cosine'"),
    ({"w_cfg": float("nan")}, "w_cfg=nan"),
])
def test_bad_inputs(kwargs, match):
    args = {"labels": [1], "w_cfg": 1.0, "w_igg": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(BB, args.pop("labels"), **args)
