"""Switti: the text-conditioned scale-wise transformer, its two CLIP text encoders, and the backbone that samples.

Our own implementation of "Switti: Designing Scale-Wise Transformers for Text-to-Image Synthesis" (Voronov et al.,
2024) in the key layout of the released checkpoints (``yresearch/Switti``, ``Switti-AR``, ``Switti-1024``,
``Switti-1024-AR``: a Hub folder with ``config.json`` and ``model.safetensors``), so that :func:`load_switti` reads
them with ``strict=True``, inferring the hyper-parameters from the tensors (``config.json`` adds the head count, the
RoPE constants and, as a cross-check, ``use_ar``).

Shapes: B batch (2B for the conditional + unconditional sampling batch), L = Σ pn² tokens of all scales, l the tokens
of one scale, C embed width, D = C conditioning width, H heads of c = C/H channels, V vocabulary, Cvae latent
channels, T text tokens (77), X context width (CLIP-L 768 + bigG 1280), P pooled width (bigG 1280).

What differs from VAR (:mod:`pipeline.backbones.var`):

- The condition is a prompt. Its context (T, X) is both encoders' last hidden states, concatenated; its pooled vector
  is bigG's ``pooler_output`` through ``text_pooler``; padding tokens are masked out of the cross-attention by an
  additive bias from bigG's padding mask. The unconditional branch encodes the empty prompt.
- A block is AdaLN self-attention, then cross-attention to the context (no AdaLN), then an AdaLN SwiGLU FFN; every
  branch has an RMSNorm before and after it. The crop condition (that of an uncropped 512 x 512 training image),
  Fourier-embedded, is added to the condition of every block's AdaLN, not to the head's.
- q and k are LayerNorm-ed (no affine) over the full width, the softmax scale is 1/√c, positions are 2-D rotary
  embeddings on each scale's own map (``rope``) instead of VAR's learned ``pos_1LC``.
- Switti (``use_ar=False``) lets a token attend to the tokens of its own scale only, so sampling keeps no
  self-attention cache; Switti-AR is block-causal like VAR and caches keys and values. The text keys and values of
  the cross-attention are computed once per batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.backbones.var import AdaLNBeforeHead, KVCache, Modulation, ScaleRollout, _check_layout, check_fit
from pipeline.backbones.vqvae import VQVAE, count_indexed, vqvae_config_from_state_dict
from pipeline.data.files import load_state_dict

PATCH_NUMS = {  # Switti's resolutions and their scales (``reso`` in a Hub config.json)
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
MAX_TEXT_TOKENS = 77               # CLIP's context: prompts are truncated or padded to it
CROP_CONDITION = (512, 512, 0, 0)  # original height, width, crop top, left of an uncropped 512 px training image
QK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class SwittiConfig:
    """Hyper-parameters of the transformer; the defaults are the Hub ``SwittiHF`` defaults (depth 30, 512 px)."""

    vocab_size: int = 4096
    z_channels: int = 32                  # Cvae of the tokenizer
    depth: int = 30
    embed_dim: int = 1920                 # SwittiHF: 64 · depth
    num_heads: int = 30                   # SwittiHF: depth
    patch_nums: tuple[int, ...] = PATCH_NUMS[512]
    context_dim: int = 768 + 1280         # X: CLIP-L and bigG hidden states side by side
    pooled_dim: int = 1280                # P: bigG pooler output
    rope: bool = True                     # 2-D rotary positions (False: learned pos_1LC as VAR)
    rope_theta: float = 10000.0
    rope_size: float = 128.0              # rotary angles of every scale span this many positions
    swiglu: bool = True                   # SwiGLU FFN (hidden 8/3 C, no biases); False: GELU FFN of mlp_ratio C
    mlp_ratio: float = 4.0
    use_ar: bool = False                  # Switti-AR: block-causal attention with a KV cache
    crop_cond: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if len(self.patch_nums) < 2 or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:], strict=False)):
            raise ValueError(f"patch_nums={self.patch_nums}: need at least 2 strictly increasing scales")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}")
        if self.rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4; got {self.embed_dim // self.num_heads}")
        if self.crop_cond and self.embed_dim % 8:
            raise ValueError(f"the crop condition needs embed_dim divisible by 8; got {self.embed_dim}")

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def axial_rope(head_dim: int, pn: int, theta: float, size: float) -> Tensor:
    """Rotations of the pn x pn tokens of one scale (row-major), (pn², c/2) complex64.

    The first c/4 frequencies turn with the column, the last c/4 with the row; positions are stretched so that the
    scale spans ``size`` positions whatever its side (a 1 x 1 scale counts as side 2).
    """
    stretch = size / (pn - 1 if pn > 1 else 1)
    freqs_f = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)) * stretch
    t_l = torch.arange(pn * pn, dtype=torch.float32)
    col_l, row_l = t_l % pn, torch.div(t_l, pn, rounding_mode="floor")
    angles = torch.cat((torch.outer(col_l, freqs_f), torch.outer(row_l, freqs_f)), dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x_BHlc: Tensor, freqs_lc: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of q or k (B, H, l, c) by ``freqs_lc`` (l, c/2), in float32."""
    x = torch.view_as_complex(x_BHlc.float().reshape(*x_BHlc.shape[:-1], -1, 2))
    return torch.view_as_real(x * freqs_lc.to(x.device)).flatten(3).type_as(x_BHlc)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _heads(x_BlC: Tensor, num_heads: int) -> Tensor:
    B, l, C = x_BlC.shape
    return x_BlC.view(B, l, num_heads, C // num_heads).permute(0, 2, 1, 3)


def _qk_norm(x_BlC: Tensor) -> Tensor:
    return F.layer_norm(x_BlC, x_BlC.shape[-1:], eps=QK_NORM_EPS)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, 1 / math.sqrt(dim // num_heads)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BlC: Tensor, freqs_lc: Tensor | None = None, attn_bias: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        B, l, C = x_BlC.shape
        q_BlC, k_BlC, v_BlC = self.to_qkv(x_BlC).view(B, l, 3, C).unbind(2)
        q_BHlc = _heads(_qk_norm(q_BlC), self.num_heads)
        k_BHlc = _heads(_qk_norm(k_BlC), self.num_heads)
        v_BHlc = _heads(v_BlC, self.num_heads)
        if freqs_lc is not None:
            q_BHlc, k_BHlc = apply_rope(q_BHlc, freqs_lc), apply_rope(k_BHlc, freqs_lc)
        if cache is not None:
            k_BHlc, v_BHlc = cache.append(k_BHlc, v_BHlc)
        out_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHlc, v_BHlc, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


class CrossAttention(nn.Module):
    """Attention of the image tokens to the text context; its keys and values are computed once per batch."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, 1 / math.sqrt(dim // num_heads)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context_BTX: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the (normalised) context, each (B, H, T, c)."""
        B, T, _ = context_BTX.shape
        k_BTC, v_BTC = self.to_kv(context_BTX).view(B, T, 2, -1).unbind(2)
        return _heads(_qk_norm(k_BTC), self.num_heads), _heads(v_BTC, self.num_heads)

    def forward(self, x_BlC: Tensor, kv: tuple[Tensor, Tensor], bias_B11T: Tensor | None) -> Tensor:
        B, l, C = x_BlC.shape
        q_BHlc = _heads(_qk_norm(self.to_q(x_BlC)), self.num_heads)
        k_BHTc, v_BHTc = (t.to(q_BHlc.dtype) for t in kv)
        mask = None if bias_B11T is None else bias_B11T.to(q_BHlc.dtype)
        out_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHTc, v_BHTc, attn_mask=mask, scale=self.scale)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim * 8 / 3)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)

    def forward(self, x_BlC: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BlC)) * self.up_proj(x_BlC))


class GeluFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BlC: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_BlC), approximate="tanh"))


class SelfCrossBlock(nn.Module):
    """AdaLN self-attention, cross-attention to the text, AdaLN FFN; each branch between two RMSNorms."""

    def __init__(self, cfg: SwittiConfig):
        super().__init__()
        C, X, eps = cfg.embed_dim, cfg.context_dim, cfg.norm_eps
        self.C = C
        self.attn = SelfAttention(C, cfg.num_heads)
        self.cross_attn = CrossAttention(C, X, cfg.num_heads)
        self.ffn = SwiGLU(C) if cfg.swiglu else GeluFFN(C, round(C * cfg.mlp_ratio))
        self.self_attention_norm1, self.self_attention_norm2 = RMSNorm(C, eps), RMSNorm(C, eps)
        self.cross_attention_norm1, self.cross_attention_norm2 = RMSNorm(C, eps), RMSNorm(C, eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(C, eps), RMSNorm(C, eps)
        self.attention_y_norm = RMSNorm(X, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.crop_cond_scales = nn.Parameter(torch.zeros(1, C)) if cfg.crop_cond else None

    def modulation(self, cond_BD: Tensor, crop_BD: Tensor | None) -> Modulation:
        """gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2, each (B, 1, C), from the pooled text (B, D) plus
        this block's share of the crop condition (B, D). Fixed for a batch: sampling computes it once."""
        if self.crop_cond_scales is not None:
            if crop_BD is None:
                raise ValueError("this Switti was trained with the crop condition; pass crop_BD")
            cond_BD = cond_BD + self.crop_cond_scales * crop_BD
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        return gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2

    def text_kv(self, context_BTX: Tensor) -> tuple[Tensor, Tensor]:
        """This block's cross-attention keys and values of a context (B, T, X), each (B, H, T, c)."""
        return self.cross_attn.context_kv(self.attention_y_norm(context_BTX))

    def forward(self, x_BlC: Tensor, mod: Modulation, kv: tuple[Tensor, Tensor], bias_B11T: Tensor | None,
                freqs_lc: Tensor | None = None, attn_bias: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        gamma1, gamma2, scale1p, scale2p, shift1, shift2 = mod
        attn = self.attn(self.self_attention_norm1(x_BlC).mul(scale1p).add(shift1), freqs_lc, attn_bias, cache)
        x_BlC = x_BlC + self.self_attention_norm2(attn).mul(gamma1)
        x_BlC = x_BlC + self.cross_attention_norm2(self.cross_attn(self.cross_attention_norm1(x_BlC), kv, bias_B11T))
        ffn = self.ffn(self.ffn_norm1(x_BlC).mul(scale2p).add(shift2))
        return x_BlC + self.ffn_norm2(ffn).mul(gamma2)


class FourierFeatures(nn.Module):
    """sin and cos of 2π·x·w for fixed random frequencies w (n,): (N,) -> (N, 2n)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n), requires_grad=False)

    def forward(self, x_N: Tensor) -> Tensor:
        proj_Nn = x_N[:, None] * self.weight[None, :] * 2 * math.pi
        return torch.cat((torch.sin(proj_Nn), torch.cos(proj_Nn)), dim=-1)


def scale_buffers(patch_nums: Sequence[int], use_ar: bool) -> tuple[Tensor, Tensor]:
    """The scale id of every token (1, L) int64, and the training mask (1, 1, L, L): 0 where a token may attend,
    -inf elsewhere; a token sees its own scale (Switti) or its own and the coarser ones (Switti-AR)."""
    lvl_L = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(patch_nums)])
    visible_LL = lvl_L[:, None] >= lvl_L[None, :] if use_ar else lvl_L[:, None] == lvl_L[None, :]
    L = lvl_L.shape[0]
    return lvl_L[None].clone(), torch.zeros(1, 1, L, L).masked_fill(~visible_LL, float("-inf"))


class Switti(nn.Module):
    """The transformer alone (tokenizer and text encoders are separate), in the released key layout."""

    def __init__(self, cfg: SwittiConfig):
        super().__init__()
        self.cfg = cfg
        C, L, K = cfg.embed_dim, cfg.L, len(cfg.patch_nums)
        self.patch_nums, self.L, self.first_l = cfg.patch_nums, L, cfg.patch_nums[0] ** 2
        self.begin_ends = []
        begin = 0
        for pn in cfg.patch_nums:
            self.begin_ends.append((begin, begin + pn * pn))
            begin += pn * pn

        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.text_pooler = nn.Linear(cfg.pooled_dim, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = None if cfg.rope else nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)
        self.blocks = nn.ModuleList(SelfCrossBlock(cfg) for _ in range(cfg.depth))
        if cfg.crop_cond:
            self.crop_embed = FourierFeatures(C // 8)
            self.crop_proj = nn.Linear(C, C)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        lvl_1L, attn_bias_for_masking = scale_buffers(cfg.patch_nums, cfg.use_ar)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", attn_bias_for_masking)
        self.register_buffer("freqs_Lc", self.rope_table(), persistent=False)

    def rope_table(self) -> Tensor:
        """Rotations of all L tokens, (L, c/2) complex64 (empty without RoPE); each scale on its own map."""
        cfg = self.cfg
        if not cfg.rope:
            return torch.zeros(0, dtype=torch.complex64)
        return torch.cat([axial_rope(cfg.head_dim, pn, cfg.rope_theta, cfg.rope_size) for pn in cfg.patch_nums])

    def freqs(self, k: int) -> Tensor | None:
        """Rotations of the tokens of scale k (l, c/2), or None without RoPE."""
        begin, end = self.begin_ends[k]
        return self.freqs_Lc[begin:end] if self.cfg.rope else None

    def lvl_pos(self, k: int) -> Tensor:
        """Level (+ learned position, without RoPE) embedding of the tokens of scale k, (1, l, C)."""
        begin, end = self.begin_ends[k]
        lvl = self.lvl_embed(self.lvl_1L[:, begin:end])
        return lvl if self.pos_1LC is None else lvl + self.pos_1LC[:, begin:end]

    def crop_condition(self, B: int) -> Tensor | None:
        """Embedded crop condition of B uncropped square images, (B, D), or None if the model has none."""
        if not self.cfg.crop_cond:
            return None
        coords_N = torch.tensor(CROP_CONDITION, dtype=torch.int32, device=self.pos_start.device).repeat(B)
        return self.crop_proj(self.crop_embed(coords_N).reshape(B, self.cfg.embed_dim))

    def first_input(self, cond_BD: Tensor) -> Tensor:
        """Input tokens of scale 0 from the pooled text condition (B, D): (B, pn_0², C)."""
        B = cond_BD.shape[0]
        return cond_BD[:, None] + self.pos_start.expand(B, self.first_l, -1) + self.lvl_pos(0)

    def scale_input(self, k: int, next_BCvhw: Tensor) -> Tensor:
        """Input tokens of scale k > 0 from f_hat downsampled to its pn x pn, (B, Cvae, pn, pn) -> (B, pn², C)."""
        return self.word_embed(next_BCvhw.flatten(2).transpose(1, 2)) + self.lvl_pos(k)

    def logits(self, x_BlC: Tensor, head_mod: Modulation) -> Tensor:
        """Output tokens (B, l, C) -> logits (B, l, V) float32."""
        return self.head(self.head_nm(x_BlC, head_mod)).float()

    def forward(self, x_BLCvae_wo_first_l: Tensor, context_BTX: Tensor, pooled_BP: Tensor,
                bias_BT: Tensor | None) -> Tensor:
        """Teacher-forced forward of all scales at once (block-diagonal or block-causal mask).

        Args:
            x_BLCvae_wo_first_l: (B, L - pn_0², Cvae) from :meth:`VQVAE.idxBl_to_var_input`.
            context_BTX, pooled_BP, bias_BT: a :class:`PromptEncoding` of B prompts.

        Returns:
            logits (B, L, V) float32; row block k predicts the tokens of scale k.
        """
        B = pooled_BP.shape[0]
        cond_BD = self.text_pooler(pooled_BP)
        crop_BD = self.crop_condition(B)
        x_BLC = torch.cat((cond_BD[:, None] + self.pos_start.expand(B, -1, -1),
                           self.word_embed(x_BLCvae_wo_first_l.float())), dim=1)
        x_BLC = x_BLC + self.lvl_embed(self.lvl_1L)
        if self.pos_1LC is not None:
            x_BLC = x_BLC + self.pos_1LC
        bias_B11T = None if bias_BT is None else bias_BT[:, None, None, :]
        freqs = self.freqs_Lc if self.cfg.rope else None
        for block in self.blocks:
            x_BLC = block(x_BLC, block.modulation(cond_BD, crop_BD), block.text_kv(context_BTX), bias_B11T,
                          freqs, self.attn_bias_for_masking)
        return self.logits(x_BLC, self.head_nm.modulation(cond_BD))


@dataclass
class PromptEncoding:
    """What the transformer sees of B prompts."""

    context_BTX: Tensor   # (B, T, X) both encoders' last hidden states side by side  # noqa: N815
    pooled_BP: Tensor     # (B, P) bigG's pooler output  # noqa: N815
    bias_BT: Tensor       # (B, T) 0 on tokens, -inf on padding (bigG's mask)  # noqa: N815

    def cat(self, other: PromptEncoding) -> PromptEncoding:
        return PromptEncoding(torch.cat((self.context_BTX, other.context_BTX)),
                              torch.cat((self.pooled_BP, other.pooled_BP)), torch.cat((self.bias_BT, other.bias_BT)))

    def expand(self, B: int) -> PromptEncoding:
        """The encoding of one prompt repeated for B images."""
        return PromptEncoding(self.context_BTX.expand(B, -1, -1), self.pooled_BP.expand(B, -1),
                              self.bias_BT.expand(B, -1))


class TextEncoders:
    """CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers (``transformers.CLIPTextModel``) with their tokenizers."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[nn.Module], max_length: int = MAX_TEXT_TOKENS):
        if len(tokenizers) != len(encoders) or not encoders:
            raise ValueError("give one tokenizer per text encoder (CLIP-L, then bigG)")
        self.tokenizers, self.encoders, self.max_length = list(tokenizers), list(encoders), max_length
        for encoder in self.encoders:
            encoder.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    def to(self, device: torch.device | str) -> TextEncoders:
        for encoder in self.encoders:
            encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        """Tokenise (truncated, padded to ``max_length``) and encode B prompts with every encoder."""
        states, out, mask_BT = [], None, None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            tokens = tokenizer(list(prompts), truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
            mask_BT = tokens["attention_mask"].to(self.device)
            out = encoder(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask_BT)
            states.append(out.last_hidden_state)
        context_BTX = torch.cat(states, dim=-1)
        bias_BT = torch.zeros(mask_BT.shape, dtype=context_BTX.dtype, device=self.device)
        return PromptEncoding(context_BTX, out.pooler_output, bias_BT.masked_fill_(mask_BT == 0, float("-inf")))


class SwittiRollout(ScaleRollout):
    """Sampling state of one batch of encoded prompts (2B rows: the prompts, then the null prompt)."""

    def __init__(self, vae: VQVAE, switti: Switti, enc_2B: PromptEncoding):
        cond_2BD = switti.text_pooler(enc_2B.pooled_BP)
        crop_2BD = switti.crop_condition(cond_2BD.shape[0])
        super().__init__(vae, switti, cond_2BD, [block.modulation(cond_2BD, crop_2BD) for block in switti.blocks],
                         switti.head_nm.modulation(cond_2BD), switti.first_input(cond_2BD))
        self.text_kvs = [block.text_kv(enc_2B.context_BTX) for block in switti.blocks]
        self.bias_2B11T: Tensor = enc_2B.bias_BT[:, None, None, :]
        self.caches = [KVCache(switti.L) if switti.cfg.use_ar else None for _ in switti.blocks]

    def _forward(self, x_BlC: Tensor) -> Tensor:
        freqs = self.model.freqs(self.k)
        for block, mod, kv, cache in zip(self.model.blocks, self.mods, self.text_kvs, self.caches, strict=True):
            x_BlC = block(x_BlC, mod, kv, self.bias_2B11T, freqs, cache=cache)
        return x_BlC

    def _keep_rows(self, B: int) -> None:
        self.text_kvs = [(k[:B], v[:B]) for k, v in self.text_kvs]
        self.bias_2B11T = self.bias_2B11T[:B]
        for cache in self.caches:
            if cache is not None:
                cache.keep_rows(B)


class SwittiBackbone:
    """A VQVAE, a Switti transformer and its text encoders (implements ``TextToImageBackbone``)."""

    def __init__(self, vae: VQVAE, switti: Switti, text: TextEncoders, null_prompt: str = ""):
        check_fit(vae, "Switti", switti.cfg.vocab_size, switti.cfg.z_channels, switti.cfg.patch_nums)
        self.vae, self.switti, self.text, self._null_prompt = vae, switti, text, null_prompt
        self._null: PromptEncoding | None = None

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.switti.patch_nums

    @property
    def vocab_size(self) -> int:
        return self.switti.cfg.vocab_size

    @property
    def null_prompt(self) -> str:
        """The prompt of the unconditional branch."""
        return self._null_prompt

    @property
    def device(self) -> torch.device:
        return self.switti.pos_start.device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        """The 2B encodings of a batch: the prompts' first, then the null prompt's B times."""
        enc = self.text.encode(prompts)
        if self._null is None:
            self._null = self.text.encode([self._null_prompt])      # the same for every batch: once
        T = enc.context_BTX.shape[1]
        null = PromptEncoding(self._null.context_BTX[:, :T], self._null.pooled_BP, self._null.bias_BT[:, :T])
        return enc.cat(null.expand(len(prompts)))

    @torch.no_grad()
    def start(self, prompts: Sequence[str]) -> SwittiRollout:
        """Begin generating one image per prompt."""
        return SwittiRollout(self.vae, self.switti, self.encode(prompts))

    def to(self, device: torch.device | str) -> SwittiBackbone:
        self.vae.to(device)
        self.switti.to(device)
        self.text.to(device)
        self._null = None
        return self


# ---- loading the Hub layout -----------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_REPOS = {  # role -> what to download into the folder
    "switti": "yresearch/Switti (or Switti-AR, Switti-1024, Switti-1024-AR)",
    "vae": "yresearch/VQVAE-Switti",
    "text_encoder": "openai/clip-vit-large-patch14",
    "text_encoder_2": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
}


def _missing(role: str, folder: Path, name: str) -> ValueError:
    return ValueError(f"{role} {folder}: missing {name}; download {HUB_REPOS[role]} into it (no network at run time)")


def _hub_folder(role: str, folder: str | Path, required: Sequence[str] = ()) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{role} {folder}: not a folder; download {HUB_REPOS[role]} into it")
    for name in required:
        if not (folder / name).is_file():
            raise _missing(role, folder, name)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise _missing(role, folder, " or ".join(WEIGHT_FILES))
    return folder


def _hub_state_dict(role: str, folder: Path) -> dict[str, Tensor]:
    """The tensors of a Hub folder: model.safetensors, else pytorch_model.bin (``weights_only=True``)."""
    path = folder / WEIGHT_FILES[0]
    return load_state_dict(path if path.is_file() else folder / WEIGHT_FILES[1], what=role,
                           fix=f"download {HUB_REPOS[role]} again")


def _hub_config(role: str, folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{role} {path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{role} {path}: expected a JSON object")
    return config


def patch_nums_from_levels(lvl_1L: Tensor) -> tuple[int, ...]:
    """Scale sides from the scale id of each token (scale k has pn_k² tokens, in order)."""
    lvl_L = lvl_1L.flatten().long()
    counts = torch.bincount(lvl_L).tolist()
    patch_nums = tuple(math.isqrt(n) for n in counts)
    if not torch.equal(lvl_L, lvl_L.sort().values) or any(pn * pn != n for pn, n in zip(patch_nums, counts,
                                                                                           strict=True)):
        raise ValueError(f"lvl_1L does not hold square token maps in scale order (tokens per scale {counts})")
    return patch_nums


def switti_config_from_state_dict(sd: dict[str, Tensor], hub: dict | None = None) -> SwittiConfig:
    """Infer the transformer's hyper-parameters from a released-layout state dict and its Hub ``config.json``.

    The tensors give the widths, depth, vocabulary, scales (``lvl_1L``, else the config's ``reso``), RoPE
    (no ``pos_1LC``), SwiGLU, crop conditioning and AR masking (``attn_bias_for_masking``, else the config's
    ``use_ar``). The config gives the heads (``num_heads``; SwittiHF has ``depth`` heads) and the RoPE constants.
    KeyError if a needed key is absent; ValueError if the tensors contradict the config.
    """
    hub = hub or {}
    depth = count_indexed(sd, "blocks.{}.ada_lin.1.weight")
    if depth == 0:
        raise KeyError("blocks.0.ada_lin.1.weight")
    if "lvl_1L" in sd:
        patch_nums = patch_nums_from_levels(sd["lvl_1L"])
    elif int(hub.get("reso", 0)) in PATCH_NUMS:
        patch_nums = PATCH_NUMS[int(hub["reso"])]
    else:
        raise KeyError("lvl_1L")
    C = sd["pos_start"].shape[2]
    use_ar = bool(hub.get("use_ar", False))
    if "attn_bias_for_masking" in sd:
        mask = sd["attn_bias_for_masking"]
        sees_coarser = bool(mask[0, 0, -1, 0] == 0)
        if "use_ar" in hub and sees_coarser != use_ar:
            raise ValueError(f"config.json says use_ar={use_ar} but attn_bias_for_masking is "
                             f"{'block-causal' if sees_coarser else 'block-diagonal'}")
        use_ar = sees_coarser
    swiglu = "blocks.0.ffn.gate_proj.weight" in sd
    return SwittiConfig(
        vocab_size=sd["head.weight"].shape[0],
        z_channels=sd["word_embed.weight"].shape[1],
        depth=depth,
        embed_dim=C,
        num_heads=int(hub.get("num_heads", depth)),
        patch_nums=patch_nums,
        context_dim=sd["blocks.0.cross_attn.to_kv.weight"].shape[1],
        pooled_dim=sd["text_pooler.weight"].shape[1],
        rope="pos_1LC" not in sd,
        rope_theta=float(hub.get("rope_theta", SwittiConfig.rope_theta)),
        rope_size=float(hub.get("rope_size", SwittiConfig.rope_size)),
        swiglu=swiglu,
        mlp_ratio=SwittiConfig.mlp_ratio if swiglu else sd["blocks.0.ffn.fc1.weight"].shape[0] / C,
        use_ar=use_ar,
        crop_cond="crop_proj.weight" in sd,
    )


def _configured(role: str, folder: Path, fn, *args):
    try:
        return fn(*args)
    except KeyError as e:
        raise ValueError(f"{role} {folder}: not a {role} checkpoint (missing {e.args[0]})") from None
    except (ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"{role} {folder}: cannot infer the hyper-parameters ({e})") from None


def load_switti_model(folder: str | Path) -> Switti:
    """The transformer of a Hub folder (config.json + model.safetensors or pytorch_model.bin), float32, eval."""
    folder = _hub_folder("switti", folder)
    sd, hub = _hub_state_dict("switti", folder), _hub_config("switti", folder)
    cfg = _configured("switti", folder, switti_config_from_state_dict, sd, hub)
    with torch.device("meta"):
        model = Switti(cfg)
    if "lvl_1L" not in sd or "attn_bias_for_masking" not in sd:   # buffers that follow from the config
        lvl_1L, attn_bias_for_masking = scale_buffers(cfg.patch_nums, cfg.use_ar)
        sd = {"lvl_1L": lvl_1L, "attn_bias_for_masking": attn_bias_for_masking, **sd}
    _check_layout(model, sd, "switti", folder)
    model.load_state_dict(sd, strict=True, assign=True)
    model.freqs_Lc = model.rope_table()
    return model.float().eval().requires_grad_(False)


def load_switti_vae(folder: str | Path, patch_nums: Sequence[int]) -> VQVAE:
    """The tokenizer of a Hub folder (VQVAE-Switti), for the scales of the transformer it serves."""
    folder = _hub_folder("vae", folder)
    sd = _hub_state_dict("vae", folder)
    vae_cfg = _configured("vae", folder, vqvae_config_from_state_dict, sd, patch_nums)
    with torch.device("meta"):
        vae = VQVAE(vae_cfg)
    ema = "quantize.ema_vocab_hit_SV"
    if ema in sd and sd[ema].shape != vae.quantize.ema_vocab_hit_SV.shape:
        sd = {**sd, ema: torch.zeros(vae.quantize.ema_vocab_hit_SV.shape)}   # training statistics only
    _check_layout(vae, sd, "vae", folder)
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.float().eval().requires_grad_(False)


def load_text_encoder(role: str, folder: str | Path):
    """A ``CLIPTokenizer`` and ``CLIPTextModel`` (float32, eval) from a local Hub folder; never the network."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()     # one bar per load would clutter every sweep worker's log

    folder = _hub_folder(role, folder, required=("config.json",))
    if not (folder / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise _missing(role, folder, f"{name} (or tokenizer.json)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True).float()
    except (OSError, ValueError) as e:
        raise ValueError(f"{role} {folder}: transformers cannot load it ({_first_line(e)})") from None
    return tokenizer, encoder.eval().requires_grad_(False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_switti(switti_dir: str | Path, vae_dir: str | Path, text_encoder_dir: str | Path,
                text_encoder_2_dir: str | Path, device: str | torch.device = "cpu",
                null_prompt: str = "") -> SwittiBackbone:
    """Load Switti from local Hub folders: the transformer, VQVAE-Switti, CLIP-L and bigG (config, weights and
    tokenizer files each). Nothing is downloaded.

    Raises:
        ValueError: one line naming the folder and the missing or unreadable file, or the mismatch.
    """
    switti = load_switti_model(switti_dir)
    vae = load_switti_vae(vae_dir, switti.patch_nums)
    tok1, enc1 = load_text_encoder("text_encoder", text_encoder_dir)
    tok2, enc2 = load_text_encoder("text_encoder_2", text_encoder_2_dir)
    X = enc1.config.hidden_size + enc2.config.hidden_size
    if (X, enc2.config.hidden_size) != (switti.cfg.context_dim, switti.cfg.pooled_dim):
        raise ValueError(f"text encoders (hidden {enc1.config.hidden_size} + {enc2.config.hidden_size}) do not fit "
                         f"switti {switti_dir} (context {switti.cfg.context_dim}, pooled {switti.cfg.pooled_dim}): "
                         "pass CLIP-L as text_encoder and bigG as text_encoder_2")
    return SwittiBackbone(vae, switti, TextEncoders([tok1, tok2], [enc1, enc2]), null_prompt).to(device)
