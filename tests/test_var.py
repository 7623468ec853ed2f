"""The VAR transformer: official layout, config inference, load/save, training forward, KV-cached sampling."""

import argparse
import contextlib
import pickle
import re

import pytest
import torch

from pipeline.backbones.base import ScaleWiseBackbone
from pipeline.backbones.var import VAR, VARConfig, load_var, random_var, var_config_from_state_dict
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.core.sampling import sample

PN = (1, 2, 3, 4)
VAE_CFG = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PN)
VAR_CFG = VARConfig(vocab_size=64, z_channels=8, depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=PN)

# The official var_d16.pth (REFERENCE.md): name -> shape, per-block entries for block i.
D16_TOP = {
    "pos_start": (1, 1, 1024), "pos_1LC": (1, 680, 1024), "lvl_1L": (1, 680), "attn_bias_for_masking": (1, 1, 680, 680),
    "word_embed.weight": (1024, 32), "word_embed.bias": (1024,), "class_emb.weight": (1001, 1024),
    "lvl_embed.weight": (10, 1024), "head_nm.ada_lin.1.weight": (2048, 1024), "head_nm.ada_lin.1.bias": (2048,),
    "head.weight": (4096, 1024), "head.bias": (4096,),
}
D16_BLOCK = {
    "attn.scale_mul_1H11": (1, 16, 1, 1), "attn.q_bias": (1024,), "attn.v_bias": (1024,), "attn.zero_k_bias": (1024,),
    "attn.mat_qkv.weight": (3072, 1024), "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
    "ffn.fc1.weight": (4096, 1024), "ffn.fc1.bias": (4096,), "ffn.fc2.weight": (1024, 4096), "ffn.fc2.bias": (1024,),
    "ada_lin.1.weight": (6144, 1024), "ada_lin.1.bias": (6144,),
}


def backbone(shared_aln: bool = False, seed: int = 0):
    cfg = VARConfig(**{**VAR_CFG.__dict__, "shared_aln": shared_aln})
    return random_var(VAE_CFG, cfg, seed=seed)


def test_d16_layout_equals_the_official_list_on_meta_device():
    with torch.device("meta"):
        var = VAR(VARConfig.official(16))
    shapes = {k: tuple(v.shape) for k, v in var.state_dict().items()}
    expected = dict(D16_TOP)
    for i in range(16):
        expected.update({f"blocks.{i}.{k}": s for k, s in D16_BLOCK.items()})
    assert shapes == expected
    assert len(shapes) == 220
    assert sum(p.numel() for p in var.parameters()) == 310_283_520
    assert {k for k, _ in var.named_buffers()} == {"lvl_1L", "attn_bias_for_masking"} | {
        f"blocks.{i}.attn.zero_k_bias" for i in range(16)}


def test_d36_shared_adaln_layout_on_meta_device():
    pn512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    with torch.device("meta"):
        var = VAR(VARConfig.official(36, shared_aln=True, patch_nums=pn512))
    shapes = {k: tuple(v.shape) for k, v in var.state_dict().items()}
    C = 36 * 64
    assert shapes["pos_1LC"] == (1, 2240, C)
    assert shapes["blocks.35.ada_gss"] == (1, 1, 6, C)
    assert shapes["shared_ada_lin.1.weight"] == (6 * C, C) and shapes["shared_ada_lin.1.bias"] == (6 * C,)
    assert not any(".ada_lin." in k for k in shapes if k.startswith("blocks."))


@pytest.mark.parametrize("shared_aln", [False, True])
def test_config_inferred_from_state_dict(shared_aln):
    bb = backbone(shared_aln)
    assert var_config_from_state_dict(bb.var.state_dict()) == bb.var.cfg


def test_block_causal_mask_buffers():
    var = backbone().var
    assert var.lvl_1L.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2] + [3] * 16]
    mask = var.attn_bias_for_masking[0, 0]
    lvl = var.lvl_1L[0]
    assert torch.equal(mask == 0, lvl[:, None] >= lvl[None, :])
    assert torch.isinf(mask[mask != 0]).all()


def test_save_load_round_trip(tmp_path):
    bb = backbone(shared_aln=True)
    bb.save(tmp_path / "vae.pth", tmp_path / "var.pth")
    loaded = load_var(tmp_path / "vae.pth", tmp_path / "var.pth")
    assert isinstance(loaded, ScaleWiseBackbone)
    for ours, theirs in ((bb.vae, loaded.vae), (bb.var, loaded.var)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.vae.cfg == bb.vae.cfg and loaded.var.cfg == bb.var.cfg
    assert not loaded.var.training and loaded.device == torch.device("cpu")
    x = sample(bb, [1, 2], w_cfg=2.0, w_igg=1.0, seed=3)
    y = sample(loaded, [1, 2], w_cfg=2.0, w_igg=1.0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(x.indices, y.indices, strict=True))
    torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)


def test_load_refuses_bad_checkpoints(tmp_path):
    bb = backbone()
    vae_p, var_p = tmp_path / "vae.pth", tmp_path / "var.pth"
    bb.save(vae_p, var_p)

    torch.save(argparse.Namespace(weights=torch.zeros(1)), tmp_path / "obj.pth")   # arbitrary pickled object
    with pytest.raises(ValueError, match=r"var_ckpt .*obj\.pth: torch\.load\(weights_only=True\) refused .*Namespace"):
        load_var(vae_p, tmp_path / "obj.pth")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}))      # plain pickle, not torch.save
    with pytest.raises(ValueError, match=r"vae_ckpt .*raw\.pkl: torch\.load\(weights_only=True\) refused it"):
        load_var(tmp_path / "raw.pkl", var_p)
    torch.save({"a": 1}, tmp_path / "ints.pth")
    with pytest.raises(ValueError, match=r"vae_ckpt .*ints\.pth: not a state dict"):
        load_var(tmp_path / "ints.pth", var_p)
    with pytest.raises(ValueError, match="not found"):
        load_var(tmp_path / "missing.pth", var_p)
    with pytest.raises(ValueError, match=r"var_ckpt .*vae\.pth: not a VAR state dict \(missing lvl_1L"):
        load_var(vae_p, vae_p)
    with pytest.raises(ValueError, match=r"vae_ckpt .*var\.pth: not a VQVAE state dict"):
        load_var(var_p, var_p)

    other = random_var(VQVAEConfig(**{**VAE_CFG.__dict__, "vocab_size": 32}),
                       VARConfig(**{**VAR_CFG.__dict__, "vocab_size": 32}))
    other.save(tmp_path / "vae32.pth", tmp_path / "var32.pth")
    with pytest.raises(ValueError, match=re.escape("(vocabulary 32, Cvae 8) does not fit")):
        load_var(tmp_path / "vae32.pth", var_p)

    sd = bb.var.state_dict()
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth: does not match .*unexpected extra\.weight"):
        load_var(vae_p, tmp_path / "extra.pth")
    torch.save({**sd, "lvl_1L": sd["lvl_1L"].flip(1)}, tmp_path / "lvl.pth")
    with pytest.raises(ValueError, match=r"lvl\.pth: cannot infer the VAR hyper-parameters \(lvl_1L does not hold"):
        load_var(vae_p, tmp_path / "lvl.pth")
    torch.save({**sd, "head.bias": torch.zeros(65)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape head\.bias \(65,\) != \(64,\)"):
        load_var(vae_p, tmp_path / "shape.pth")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRECISIONS = [  # (device, autocast dtype of the sampler, tolerance of cached vs teacher-forced logits)
    ("cpu", None, 1e-5),
    pytest.param("cuda", torch.float16, 2e-2, marks=CUDA),
    pytest.param("cuda", torch.bfloat16, 1e-1, marks=CUDA),
]


@pytest.mark.parametrize(("device", "amp_dtype", "tol"), PRECISIONS)
@pytest.mark.parametrize("shared_aln", [False, True])
def test_kv_cached_logits_equal_teacher_forced_logits(shared_aln, device, amp_dtype, tol):
    bb = backbone(shared_aln).to(device)
    labels = torch.tensor([0, 4, 9], device=device)
    steps = []
    kw = {} if amp_dtype is None else {"amp_dtype": amp_dtype}
    result = sample(bb, labels, w_cfg=3.0, w_igg=1.0, top_k=0, seed=1, callback=steps.append, **kw)
    assert result.images.device.type == "cpu" and torch.isfinite(result.images).all()
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        x_BLC = bb.vae.idxBl_to_var_input([i.to(device) for i in result.indices])
        cond_BLV = bb.var(labels, x_BLC).float()
        uncond_BLV = bb.var(torch.full_like(labels, bb.num_classes), x_BLC).float()
    for step, (begin, end) in zip(steps, bb.var.begin_ends, strict=True):
        torch.testing.assert_close(step.cond.float(), cond_BLV[:, begin:end], rtol=tol, atol=tol)
        torch.testing.assert_close(step.uncond.float(), uncond_BLV[:, begin:end], rtol=tol, atol=tol)


def test_training_forward_label_dropout_and_block_causality():
    var = VAR(VARConfig(**{**VAR_CFG.__dict__, "cond_drop_rate": 1.0}))
    labels = torch.tensor([1, 2])
    null = torch.full_like(labels, var.num_classes)
    x = torch.randn(2, var.L - 1, 8)
    var.train()
    torch.testing.assert_close(var(labels, x), var(null, x), rtol=0, atol=0)   # every label dropped
    var.eval()
    assert not torch.allclose(var(labels, x), var(null, x))                  # no dropout in eval

    begin, end = var.begin_ends[2]
    x2 = x.clone()
    x2[:, begin - 1:end - 1] += 1.0     # the input tokens of scale 2 (x has no scale-0 rows)
    a, b = var(labels, x), var(labels, x2)
    torch.testing.assert_close(a[:, :begin], b[:, :begin], rtol=0, atol=0)   # coarser scales unaffected
    assert not torch.allclose(a[:, begin:], b[:, begin:])


def test_training_forward_backpropagates_into_every_parameter():
    var = VAR(VARConfig(**{**VAR_CFG.__dict__, "cond_drop_rate": 0.0}))
    var.train()
    logits = var(torch.tensor([1, 2]), torch.randn(2, var.L - 1, 8))
    assert logits.shape == (2, var.L, 64) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(64, (2 * var.L,))).backward()
    no_grad = [n for n, p in var.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == ["class_emb.weight"] or no_grad == []   # the null row never sees a gradient, others do
    assert var.class_emb.weight.grad[[1, 2]].abs().sum() > 0


def test_rollout_order_is_enforced():
    bb = backbone()
    rollout = bb.start(torch.tensor([1]))
    with pytest.raises(RuntimeError, match="take"):
        rollout.take(torch.zeros(1, 1, dtype=torch.int64))
    rollout.logits()
    with pytest.raises(RuntimeError, match="alternate"):
        rollout.logits()
    with pytest.raises(RuntimeError, match="decode"):
        rollout.decode()
