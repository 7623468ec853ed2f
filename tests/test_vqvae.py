"""The multi-scale VQ tokenizer: official layout, config inference, round trips, training step."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones.vqvae import VQVAE, VQVAEConfig, vqvae_config_from_state_dict

TINY = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))


def tiny_vae(seed: int = 0, **overrides) -> VQVAE:
    torch.manual_seed(seed)
    cfg = VQVAEConfig(**{**TINY.__dict__, **overrides})
    vae = VQVAE(cfg)
    with torch.no_grad():   # spread the codebook so that different positions pick different codes
        vae.quantize.embedding.weight.normal_()
    return vae


def images(B: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_official_vae_layout_on_meta_device():
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    sd = vae.state_dict()
    assert len(sd) == 324
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["quantize.embedding.weight"] == (4096, 32)
    assert shapes["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert shapes["post_quant_conv.weight"] == (32, 32, 3, 3)
    assert shapes["encoder.conv_in.weight"] == (160, 3, 3, 3)
    assert [f"quantize.quant_resi.qresi_ls.{i}.weight" in shapes for i in range(5)] == [True] * 4 + [False]
    assert shapes["quantize.quant_resi.qresi_ls.3.weight"] == (32, 32, 3, 3)
    assert "encoder.down.4.attn.1.qkv.weight" in shapes and "encoder.down.3.attn.0.qkv.weight" not in shapes
    assert "decoder.up.4.attn.2.qkv.weight" in shapes and "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.up.1.upsample.conv.weight"] == (160, 160, 3, 3)
    assert VQVAEConfig().image_size == 256


@pytest.mark.parametrize("overrides", [{}, {"using_sa": False, "using_mid_sa": False},
                                       {"quant_resi": 0.0}, {"share_quant_resi": 3, "ch_mult": (1, 1, 2)}])
def test_config_inferred_from_state_dict(overrides):
    cfg = VQVAEConfig(**{**TINY.__dict__, **overrides})
    with torch.device("meta"):
        sd = VQVAE(cfg).state_dict()
    inferred = vqvae_config_from_state_dict(sd, cfg.patch_nums)
    assert inferred == cfg or (cfg.quant_resi == 0 and inferred.quant_resi == 0)


def test_phi_choice_matches_official_ticks():
    vae = VQVAE(VQVAEConfig(vocab_size=8, z_channels=4, ch=32, ch_mult=(1,)))
    # ticks linspace(1/12, 11/12, 4); k=2 (2/9) is a tie in exact arithmetic, float rounding picks φ_1 as in VAR
    assert [vae.quantize.quant_resi.index(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_nearest_is_brute_force_argmin():
    vae = tiny_vae()
    rest_BChw = torch.randn(2, 8, 4, 4)
    idx_Bl = vae.quantize.nearest(rest_BChw, 2)
    z_NC = F.adaptive_avg_pool2d(rest_BChw, 2).permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(z_NC, vae.quantize.embedding.weight).argmin(1).view(2, 4)
    assert torch.equal(idx_Bl, expected)


@torch.no_grad()
def test_tokenizer_round_trip():
    vae = tiny_vae()
    img = images(3, vae.cfg.image_size)
    idx = vae.img_to_idxBl(img)
    assert [tuple(i.shape) for i in idx] == [(3, 1), (3, 4), (3, 16)]
    assert all(i.dtype == torch.int64 and i.min() >= 0 and i.max() < 32 for i in idx)
    assert all(torch.equal(a, b) for a, b in zip(idx, vae.img_to_idxBl(img), strict=True))
    assert len({t for i in idx for t in i.flatten().tolist()}) > 1

    f_hats = vae.quantize.quantize(vae.quant_conv(vae.encoder(img)))[1]
    f_hat = vae.idxBl_to_fhat(idx)
    torch.testing.assert_close(f_hat, f_hats[-1])
    rec = vae.idxBl_to_img(idx)
    assert rec.shape == img.shape and rec.abs().max() <= 1
    torch.testing.assert_close(rec, vae.idxBl_to_img(idx), rtol=0, atol=0)


@torch.no_grad()
def test_teacher_forcing_input_and_autoregressive_steps_agree():
    vae = tiny_vae()
    idx = vae.img_to_idxBl(images(2, vae.cfg.image_size))
    x_BLC = vae.idxBl_to_var_input(idx)
    assert x_BLC.shape == (2, 4 + 16, 8)
    begin = 0
    for k, pn in enumerate(vae.patch_nums[1:], start=1):
        expected = F.interpolate(vae.idxBl_to_fhat(idx[:k]), size=(pn, pn), mode="area")
        torch.testing.assert_close(x_BLC[:, begin:begin + pn * pn], expected.flatten(2).transpose(1, 2))
        begin += pn * pn

    f_hat = torch.zeros(2, 8, 4, 4)
    for k, idx_Bl in enumerate(idx):
        f_hat, nxt = vae.get_next_autoregressive_input(k, 3, f_hat, vae.quantize.code_map(idx_Bl))
    assert nxt is f_hat
    torch.testing.assert_close(f_hat, vae.idxBl_to_fhat(idx))
    with pytest.raises(ValueError, match="K=4"):
        vae.get_next_autoregressive_input(0, 4, f_hat, vae.quantize.code_map(idx[0]))


def test_training_step_straight_through_and_gradients():
    vae = tiny_vae(test_mode=False)
    vae.train()
    img = images(2, vae.cfg.image_size)
    rec, vq_loss, usages = vae(img, ret_usages=True)
    assert rec.shape == img.shape and vq_loss.dim() == 0 and vq_loss.item() > 0
    assert len(usages) == 3 and all(0 <= u <= 100 for u in usages)
    # first step: the EMA of code hits is the hit count itself, B * pn^2 per scale
    assert vae.quantize.ema_vocab_hit_SV.sum(1).tolist() == [2.0, 8.0, 32.0]
    (rec.square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "quant_conv.weight", "post_quant_conv.weight"):
        grad = vae.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    f = torch.randn(2, 8, 4, 4, requires_grad=True)
    f_hat_st, _, _ = vae.quantize(f)
    torch.testing.assert_close(f_hat_st, vae.quantize.quantize(f)[1][-1])
    g = torch.randn_like(f)
    (f_hat_st * g).sum().backward()
    torch.testing.assert_close(f.grad, g)    # straight-through: identity gradient into the encoder output


def test_frozen_in_test_mode():
    vae = tiny_vae()
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_bad_inputs():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="last scale"):
        vae.img_to_idxBl(images(1, 16))
    with pytest.raises(ValueError, match="patch_nums"):
        VQVAEConfig(patch_nums=(1, 3, 2))
    with pytest.raises(ValueError, match="multiple of 32"):
        VQVAEConfig(ch=48)
