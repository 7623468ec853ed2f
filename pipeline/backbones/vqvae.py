"""VAR's multi-scale VQ tokenizer (VQVAE): CNN encoder/decoder and the residual quantizer with φ convs.

Our own implementation of the tokenizer of "Visual Autoregressive Modeling" (Tian et al., 2024), written to load
the official ``vae_ch160v4096z32.pth`` state dict as it is (same parameter names and shapes), with a
configurable ``ch_mult`` (the official code hard-codes (1, 1, 2, 2, 4), i.e. 16x downsampling) and no
``torch.distributed`` calls.

Shapes: B batch, C = Cvae latent channels, H = W = ``patch_nums[-1]`` latent side, pn the side of scale k,
l = pn*pn tokens of one scale, V vocabulary size. Images are float in [-1, 1] unless said otherwise.

The image is tokenised from coarse to fine: at scale k the residual ``f - f_hat`` is area-downsampled to pn x pn,
each position takes its nearest code, the codes are bicubic-upsampled to H x W, blended through one of a few
shared 3x3 convs φ (h -> (1 - r) h + r conv(h)) and added to ``f_hat``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP_NORM_GROUPS = 32          # GroupNorm groups of the official VQGAN-style blocks (fixed by the checkpoints)
USAGE_MARGIN = 0.08             # a code counts as "used" at a scale if its EMA hits >= this x the uniform share
EMA_WARMUP_STEPS = 100          # EMA of code hits: momentum 0.9 for the first steps, then 0.99


@dataclass(frozen=True)
class VQVAEConfig:
    """Hyper-parameters of the tokenizer; the defaults are the official ``vae_ch160v4096z32.pth``."""

    vocab_size: int = 4096
    z_channels: int = 32                           # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)     # one entry per resolution; downsampling 2**(len - 1)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25                             # commitment loss weight
    quant_resi: float = 0.5                        # φ(h) = (1 - r) h + r conv(h); 0 disables the φ convs
    share_quant_resi: int = 4                      # number of partially shared φ convs
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    using_sa: bool = True                          # self-attention at the lowest resolution
    using_mid_sa: bool = True                      # self-attention in the middle block
    test_mode: bool = True                         # eval mode and frozen parameters (inference)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if len(self.patch_nums) < 2 or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:], strict=False)):
            raise ValueError(f"patch_nums={self.patch_nums}: need at least 2 strictly increasing scales")
        if not self.ch_mult or any(self.ch * m % GROUP_NORM_GROUPS for m in self.ch_mult):
            raise ValueError(f"ch={self.ch}, ch_mult={self.ch_mult}: every ch*m must be a multiple of "
                             f"{GROUP_NORM_GROUPS} (GroupNorm groups)")
        if self.share_quant_resi < 1:
            raise ValueError(f"share_quant_resi={self.share_quant_resi}: need at least one φ conv")

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x_BChw: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BChw: Tensor) -> Tensor:
        B, C, h, w = x_BChw.shape
        q_BNC, k_BNC, v_BNC = self.qkv(self.norm(x_BChw)).view(B, 3, C, h * w).transpose(2, 3).unbind(1)
        out_BNC = F.scaled_dot_product_attention(q_BNC, k_BNC, v_BNC)
        return x_BChw + self.proj_out(out_BNC.transpose(1, 2).reshape(B, C, h, w))


class Downsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BChw: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, optional attention after each, resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, dropout: float, attn: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_blocks if attn else 0))

    def forward(self, h_BChw: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h_BChw = block(h_BChw)
            if self.attn:
                h_BChw = self.attn[i](h_BChw)
        return h_BChw


class MidBlock(nn.Module):
    def __init__(self, ch: int, dropout: float, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, dropout)
        self.attn_1 = AttnBlock(ch) if attn else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, dropout)

    def forward(self, h_BChw: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h_BChw)))


class Encoder(nn.Module):
    """(B, 3, H*d, W*d) image -> (B, Cvae, H, W) latent, d = 2**(len(ch_mult) - 1)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chs) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, out_ch in enumerate(chs):
            level = Level(cfg.ch if i == 0 else chs[i - 1], out_ch, cfg.num_res_blocks, cfg.dropout,
                          attn=cfg.using_sa and i == last)
            if i != last:
                level.downsample = Downsample2x(out_ch)
            self.down.append(level)
        self.mid = MidBlock(chs[-1], cfg.dropout, cfg.using_mid_sa)
        self.norm_out = _norm(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    """(B, Cvae, H, W) latent -> (B, 3, H*d, W*d) image (unclamped)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chs) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = MidBlock(chs[-1], cfg.dropout, cfg.using_mid_sa)
        levels = []
        for i in range(last, -1, -1):   # built from the lowest resolution up; stored by resolution index
            level = Level(chs[min(i + 1, last)], chs[i], cfg.num_res_blocks + 1, cfg.dropout,
                          attn=cfg.using_sa and i == last)
            if i != 0:
                level.upsample = Upsample2x(chs[i])
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(chs[0])
        self.conv_out = nn.Conv2d(chs[0], 3, 3, padding=1)

    def forward(self, z_BChw: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Phi(nn.Conv2d):
    """φ: h -> (1 - r) h + r conv3x3(h)."""

    def __init__(self, ch: int, ratio: float):
        super().__init__(ch, ch, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: Tensor) -> Tensor:
        return h_BChw * (1 - self.ratio) + super().forward(h_BChw) * self.ratio


class PhiPartiallyShared(nn.Module):
    """A few φ convs shared by the K scales; scale k uses the one whose tick is nearest to k / (K - 1)."""

    def __init__(self, ch: int, ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(ch, ratio) if ratio != 0 else nn.Identity() for _ in range(count))
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count     # the official ticks
        self.ticks = np.linspace(margin, 1 - margin, count)

    def index(self, k: int, K: int) -> int:
        return int(np.argmin(np.abs(self.ticks - k / (K - 1))))

    def forward(self, h_BChw: Tensor, k: int, K: int) -> Tensor:
        return self.qresi_ls[self.index(k, K)](h_BChw)


class MultiScaleQuantizer(nn.Module):
    """VAR's residual multi-scale quantizer (official name ``VectorQuantizer2``)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.patch_nums = cfg.patch_nums
        self.vocab_size, self.Cvae, self.beta = cfg.vocab_size, cfg.z_channels, cfg.beta
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiPartiallyShared(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.record_hit = 0

    def upsample_code(self, k: int, h_BChw: Tensor) -> Tensor:
        """(B, C, pn, pn) code map of scale k -> its (B, C, H, W) contribution to f_hat (upsample, then φ)."""
        K, side = len(self.patch_nums), self.patch_nums[-1]
        if k != K - 1:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
        return self.quant_resi(h_BChw, k, K)

    def code_map(self, idx_Bl: Tensor) -> Tensor:
        """(B, pn*pn) indices -> (B, C, pn, pn) code vectors."""
        B, l = idx_Bl.shape
        pn = math.isqrt(l)
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def nearest(self, rest_BChw: Tensor, pn: int) -> Tensor:
        """Index (B, pn*pn) of the code nearest (L2) to each position of the residual area-pooled to pn x pn."""
        B, C, H, _ = rest_BChw.shape
        if pn != H:
            rest_BChw = F.interpolate(rest_BChw, size=(pn, pn), mode="area")
        z_NC = rest_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        codes_VC = self.embedding.weight.detach()
        d_NV = z_NC.square().sum(1, keepdim=True) + codes_VC.square().sum(1)
        d_NV.addmm_(z_NC, codes_VC.T, alpha=-2)
        return d_NV.argmin(dim=1).view(B, pn * pn)

    def quantize(self, f_BChw: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Residual quantization of a latent (B, C, H, W), coarse to fine.

        Returns the indices (B, pn*pn) of each scale and f_hat (B, C, H, W) after each scale; the f_hats carry
        gradients into the codebook and the φ convs (not into f).
        """
        side = self.patch_nums[-1]
        if tuple(f_BChw.shape[2:]) != (side, side):
            raise ValueError(f"latent is {tuple(f_BChw.shape[2:])}, the last scale needs ({side}, {side}): "
                             f"feed images of side {side} x the VAE downsampling")
        f_rest = f_BChw.detach().float()
        f_hat = torch.zeros_like(f_rest)
        idx_per_scale, f_hats = [], []
        for k, pn in enumerate(self.patch_nums):
            idx_Bl = self.nearest(f_rest, pn)
            h_BChw = self.upsample_code(k, self.code_map(idx_Bl))
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            idx_per_scale.append(idx_Bl)
            f_hats.append(f_hat)
        return idx_per_scale, f_hats

    def forward(self, f_BChw: Tensor, ret_usages: bool = False) -> tuple[Tensor, Tensor, list[float] | None]:
        """Training step: straight-through f_hat (B, C, H, W), VQ loss (scalar), code usage % per scale or None."""
        f = f_BChw.float()
        with torch.autocast(f.device.type, enabled=False):
            idx_per_scale, f_hats = self.quantize(f)
            f_no_grad = f.detach()
            vq_loss = sum(F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f_no_grad)
                          for f_hat in f_hats) / len(f_hats)
            f_hat_st = (f_hats[-1].detach() - f_no_grad) + f
        if self.training:
            self._record_hits(idx_per_scale)
        usages = None
        if ret_usages:
            B, _, H, W = f.shape
            margin = B * H * W / self.vocab_size * USAGE_MARGIN
            usages = [(row >= margin).float().mean().item() * 100 for row in self.ema_vocab_hit_SV]
        return f_hat_st, vq_loss, usages

    @torch.no_grad()
    def _record_hits(self, idx_per_scale: Sequence[Tensor]) -> None:
        momentum = 0.0 if self.record_hit == 0 else 0.9 if self.record_hit < EMA_WARMUP_STEPS else 0.99
        for k, idx_Bl in enumerate(idx_per_scale):
            hit_V = idx_Bl.flatten().bincount(minlength=self.vocab_size).float()
            self.ema_vocab_hit_SV[k].mul_(momentum).add_(hit_V * (1 - momentum))
        self.record_hit += 1


class VQVAE(nn.Module):
    """Encoder + multi-scale quantizer + decoder, in the official key layout."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.Cvae, self.vocab_size, self.patch_nums = cfg.z_channels, cfg.vocab_size, cfg.patch_nums
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        if cfg.test_mode:
            self.eval()
            self.requires_grad_(False)

    def forward(self, img_B3HW: Tensor, ret_usages: bool = False) -> tuple[Tensor, Tensor, list[float] | None]:
        """Training forward: reconstruction (B, 3, H, W) (unclamped), VQ loss, usages (% per scale) or None."""
        f_hat, vq_loss, usages = self.quantize(self.quant_conv(self.encoder(img_B3HW)), ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, usages

    def img_to_idxBl(self, img_B3HW: Tensor) -> list[Tensor]:
        """Image in [-1, 1] -> indices (B, pn*pn) int64 per scale."""
        return self.quantize.quantize(self.quant_conv(self.encoder(img_B3HW)))[0]

    def idxBl_to_fhat(self, idx_per_scale: Sequence[Tensor]) -> Tensor:
        """Indices per scale -> f_hat (B, Cvae, H, W), the sum of every scale's contribution."""
        f_hat = None
        for k, idx_Bl in enumerate(idx_per_scale):
            h_BChw = self.quantize.upsample_code(k, self.quantize.code_map(idx_Bl))
            f_hat = h_BChw if f_hat is None else f_hat + h_BChw
        return f_hat

    def fhat_to_img(self, f_hat_BChw: Tensor) -> Tensor:
        """(B, Cvae, H, W) -> image (B, 3, H*d, W*d) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    def idxBl_to_img(self, idx_per_scale: Sequence[Tensor]) -> Tensor:
        """Indices of all scales -> image in [-1, 1]."""
        return self.fhat_to_img(self.idxBl_to_fhat(idx_per_scale))

    def idxBl_to_var_input(self, idx_per_scale: Sequence[Tensor]) -> Tensor:
        """Teacher-forcing input of the VAR transformer: (B, L - pn_0**2, Cvae).

        Row block k (k >= 1) is f_hat after scales 0..k-1, area-downsampled to scale k's pn x pn, row-major.
        """
        B = idx_per_scale[0].shape[0]
        side = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, side, side, device=idx_per_scale[0].device)
        inputs = []
        for k in range(len(self.patch_nums) - 1):
            f_hat, next_BChw = self.get_next_autoregressive_input(
                k, len(self.patch_nums), f_hat, self.quantize.code_map(idx_per_scale[k]))
            inputs.append(next_BChw.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def get_next_autoregressive_input(self, k: int, K: int, f_hat_BChw: Tensor,
                                      h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """One sampling step: add scale k's code map (B, C, pn, pn) to f_hat.

        Returns the new f_hat (B, C, H, W) and the next scale's input map (B, C, pn', pn') (f_hat itself after the
        last scale).
        """
        if len(self.patch_nums) != K:
            raise ValueError(f"K={K} but the VAE has {len(self.patch_nums)} scales")
        f_hat_BChw = f_hat_BChw + self.quantize.upsample_code(k, h_BChw)
        if k == K - 1:
            return f_hat_BChw, f_hat_BChw
        pn = self.patch_nums[k + 1]
        return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")


def count_indexed(sd: dict[str, Tensor], pattern: str) -> int:
    """Number of consecutive indices i = 0, 1, ... for which ``pattern.format(i)`` is a key of ``sd``."""
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


def vqvae_config_from_state_dict(sd: dict[str, Tensor], patch_nums: Sequence[int]) -> VQVAEConfig:
    """Infer the tokenizer's hyper-parameters from an official-layout state dict (KeyError if a key is absent)."""
    vocab_size, z_channels = sd["quantize.embedding.weight"].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    n_levels = max(count_indexed(sd, "encoder.down.{}.block.0.conv1.weight"), 1)
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
    n_phis = count_indexed(sd, "quantize.quant_resi.qresi_ls.{}.weight")
    return VQVAEConfig(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
        num_res_blocks=count_indexed(sd, "encoder.down.0.block.{}.conv1.weight"),
        quant_resi=0.5 if n_phis else 0.0, share_quant_resi=n_phis or VQVAEConfig.share_quant_resi,
        patch_nums=tuple(patch_nums),
        using_sa=f"encoder.down.{n_levels - 1}.attn.0.qkv.weight" in sd,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
    )
