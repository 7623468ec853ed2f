"""Infinity: the bitwise text-to-image scale-wise transformer, its BSQ decoder and T5 encoder, and the backbone.

Our own implementation of "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image Synthesis"
(Han et al., 2024) in the key layout of the released checkpoints (``infinity_2b_reg.pth``: Infinity's state dict;
``infinity_8b_weights/``: the same, sharded in transformers' layout; ``infinity_vae_d32reg.pth`` /
``infinity_vae_d32_reg.pth`` / ``infinity_vae_d56_f8_14_patchify.pth``: ``{"vae": state dict}`` of the BSQ
tokenizer), so that :func:`load_infinity` reads them with ``torch.load(weights_only=True)`` and ``strict=True`` (the
VAE's encoder and quantizer buffer are not used and skipped by name), inferring the hyper-parameters from the
tensors. The parity with ``Infinity.autoregressive_infer_cfg`` (FoundationVision/Infinity at 4c27bbb) is tested bit
for bit on tiny random models of both layouts (tests/infinity_reference.py, tests/test_infinity.py,
tests/test_infinity8b.py).

Shapes: B batch (2B: conditional rows, then unconditional ones), l tokens of one scale (h·w), C width, D = C the
condition width, H heads of c = C/H channels, d bits per token, X the text width (flan-t5-xl: 2048), T text tokens.

What differs from VAR and Switti:

- A token is d bits (the BSQ code ``(2·bit − 1)/√d``). The head gives 2·d logits per token, a pair per bit; the
  sampler draws each bit from its pair (:func:`pipeline.core.sampling.sample_bits`). The token index we report is
  the integer whose binary digits are the bits, most significant first (BSQ's own ``mask``).
- Spatial patchify (Infinity-8B, the official ``apply_spatial_patchify=1``): a token is a 2 x 2 patch of the VAE's
  codes, 4·d bits (56 for the 14-bit VAE), in ``pixel_unshuffle``'s channel order; the VAE's maps have twice the
  transformer's sides. It is inferred from the two state dicts: the transformer's tokens hold 4x the VAE's bits.
- The condition is a T5 encoding, unpadded: prompt i has its own number of tokens. The unconditional branch is the
  learned ``cfg_uncond`` embedding cut to each prompt's own length, or a negative prompt's encoding. An attentive
  pool of the text is both the start token and the AdaLN condition; every block cross-attends to the text.
- Self-attention is cosine attention (q, k L2-normalised, q times a per-head learned scale, clamped at 100), with 2-D
  rotary positions indexed on the 1M schedule's last map (``rope2d_normalized_by_hw=2``), and a KV cache over
  scales. The AdaLN parameters are one shared projection of the condition plus a per-block table (``ada_gss``).
- Cross-attention (and the text pool) runs in bfloat16 in the official code: flash-attn's varlen kernel, which takes
  no float32, so q and kv are cast to bfloat16 and the output comes back in bfloat16. ``InfinityConfig.text_attn_bf16``
  (default True) rounds q, k, v and the output to bfloat16 the same way and computes the attention in float32, which
  reproduces the official bits; False computes it in float32 throughout (tests/test_infinity.py measures the change).
- Temperature: the logits of scale k are multiplied by ``1/tau_k`` before guidance (both halves), as the official code.
- Scale schedules are the square ones of Infinity's ``dynamic_resolution.py``: 7, 10, 12, 13 scales for 0.06M, 0.25M,
  0.60M, 1M pixels (256 to 1024 px at 16 px per token).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.backbones.base import Alternation
from pipeline.data.files import load_state_dict, load_weights

SQUARE_SIDES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)   # dynamic_resolution.py, h/w = 1
SCHEDULES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}      # pixels -> number of scales
LVL_EMBEDS = 15                                                    # rows of lvl_embed in every checkpoint
MAX_SCALE_MUL = float(torch.tensor(100.0).log())                   # cosine attention: q's scale at most 100
ROPE_THETA = 10000.0


def square_schedule(pixels: str) -> tuple[int, ...]:
    """Sides of the square token maps of one resolution (``0.06M`` .. ``1M``)."""
    if pixels not in SCHEDULES:
        raise ValueError(f"pixels={pixels!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    return SQUARE_SIDES[:SCHEDULES[pixels]]


def official_guidance(cfg: float | Sequence[float], K: int) -> tuple[float | None, list[float | None]]:
    """Infinity's ``cfg`` (one value, or the per-scale ``cfg_list``) as guidetune's ``(w_cfg, schedule)``.

    The official guided logits are ``cfg_k·cond + (1 − cfg_k)·uncond``, our ``uncond + t_k·(cond − uncond)`` with
    ``t_k = 1 + ratio_k·w_cfg``: so ``cfg_k = t_k``, i.e. VAR's ``1 + t``. One value c: ``w_cfg = c − 1`` on the
    constant schedule (ratio 1 at every scale). A list: ``w_cfg = 1`` and ``ratio_k = cfg_k − 1``. A scale whose
    cfg is 1 is not guided (ratio None): the official code then samples the conditional logits themselves, and with
    every cfg at 1 it computes no unconditional half (our ``drop_uncond=True``).
    """
    cfg_K = [float(cfg)] * K if isinstance(cfg, int | float) else [float(c) for c in cfg]
    if len(cfg_K) != K or not all(math.isfinite(c) for c in cfg_K):
        raise ValueError(f"cfg={cfg!r}: give one finite value, or one per scale ({K})")
    if isinstance(cfg, int | float):
        return (None, [None] * K) if cfg_K[0] == 1 else (cfg_K[0] - 1, [1.0] * K)
    return 1.0, [None if c == 1 else c - 1 for c in cfg_K]


@dataclass
class InfinityArgs:
    """A CFG setting as the arguments of the official sampler: ``gen_one_img`` of tools/run_infinity.py, which passes
    them to ``Infinity.autoregressive_infer_cfg`` (FoundationVision/Infinity at 4c27bbb). A value the same at every
    scale is one number (the CLI's ``--cfg`` / ``--tau``), else one per scale."""

    pn: str                          # the scale schedule (--pn)
    cfg_list: float | list[float]    # cfg_k: cfg_k·cond + (1 − cfg_k)·uncond; 1 is unguided
    tau_list: float | list[float]    # the temperature of each scale's logits
    top_k: int
    top_p: float
    negative_prompt: str = ""        # "": the learned unconditional embedding (cfg_uncond)
    # 0: guidance on the logits, as the CLI; pass it to gen_one_img, whose default (-5) guides a hidden state
    cfg_insertion_layer: list[int] = field(default_factory=lambda: [0])


def _one_or_per_scale(values_K: Sequence[float]) -> float | list[float]:
    return values_K[0] if len(set(values_K)) == 1 else list(values_K)


def infinity_args(w_cfg: float | None, ratio_K: Sequence[float | None], tau_K: Sequence[float], *, top_k: int,
                  top_p: float, negative_prompt: str | None) -> InfinityArgs:
    """Our ``(w_cfg, schedule)`` as the official arguments (the inverse of :func:`official_guidance`): scale k's
    guided logits ``uncond + (1 + ratio_k·w_cfg)·(cond − uncond)`` are the official ones at ``cfg_k = 1 + ratio_k·
    w_cfg``, and 1 where the scale is not guided (ratio None, or no CFG term)."""
    K = len(ratio_K)
    if K not in SCHEDULES.values() or len(tau_K) != K:
        raise ValueError(f"{K} ratios and {len(tau_K)} temperatures: give one of each per scale of a square "
                         f"schedule ({', '.join(f'{p}: {n}' for p, n in SCHEDULES.items())})")
    cfg_K = [1.0 if w_cfg is None or r is None else 1 + r * w_cfg for r in ratio_K]
    pn = next(p for p, n in SCHEDULES.items() if n == K)
    return InfinityArgs(pn=pn, cfg_list=_one_or_per_scale(cfg_K), tau_list=_one_or_per_scale([float(t) for t in tau_K]),
                        top_k=top_k, top_p=top_p, negative_prompt=negative_prompt or "")


@dataclass(frozen=True)
class InfinityConfig:
    """Hyper-parameters of the transformer; the defaults are Infinity-2B's (``infinity_2b_reg.pth``, infer.sh)."""

    embed_dim: int = 2048
    depth: int = 32
    num_heads: int = 16                 # 2B: width / 128
    block_chunks: int = 8               # blocks are stored as chunks (block_chunks.{c}.module.{j})
    mlp_hidden: int = 8192              # round(4·C / 256)·256
    bits: int = 32                      # bits per token: the VAE's codebook_dim d, or 4·d (spatial patchify)
    text_dim: int = 2048                # X: flan-t5-xl's width
    text_maxlen: int = 512              # rows of cfg_uncond; T5 pads and truncates to this
    pool_heads: int = 16                # the text pool's heads (X / 128)
    patch_nums: tuple[int, ...] = square_schedule("1M")
    lvl_embed_every_chunk: bool = False  # official add_lvl_embeding_only_first_block=0 (2B: 1, first block only)
    text_attn_bf16: bool = True         # cross-attention and text pool rounded to bfloat16 as flash-attn (see above)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.patch_nums != SQUARE_SIDES[:len(self.patch_nums)] or len(self.patch_nums) not in SCHEDULES.values():
            raise ValueError(f"patch_nums={self.patch_nums}: not one of Infinity's square schedules "
                             f"({', '.join(f'{p}: {n} scales' for p, n in SCHEDULES.items())})")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim={self.embed_dim} needs num_heads={self.num_heads} heads of a width "
                             "divisible by 4 (2-D rotary positions)")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth={self.depth} is not a multiple of block_chunks={self.block_chunks}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


# ---- text attention (flash-attn's varlen cross-attention, as dense attention over padded text) -------------------

def text_attention(q_BHlc: Tensor, k_BHTc: Tensor, v_BHTc: Tensor, keep_B11T: Tensor, bf16: bool) -> Tensor:
    """Attention of queries over each row's own text tokens (``keep_B11T`` True), scale 1/√c, in float32.

    With ``bf16`` the inputs and the output are rounded to bfloat16 first and last, as the official code's cast
    around flash-attn. Returns (B, l, H·c) float32.
    """
    if bf16:
        q_BHlc, k_BHTc, v_BHTc = (t.to(torch.bfloat16).float() for t in (q_BHlc, k_BHTc, v_BHTc))
    out_BHlc = F.scaled_dot_product_attention(q_BHlc.float(), k_BHTc.float(), v_BHTc.float(), attn_mask=keep_B11T,
                                              scale=1 / math.sqrt(q_BHlc.shape[-1]))
    if bf16:
        out_BHlc = out_BHlc.to(torch.bfloat16).float()
    B, H, l, c = out_BHlc.shape
    return out_BHlc.transpose(1, 2).reshape(B, l, H * c)


def _kv_heads(text_BTX: Tensor, mat_kv: nn.Linear, v_bias: Tensor, zero_k_bias: Tensor, H: int
              ) -> tuple[Tensor, Tensor]:
    B, T, _ = text_BTX.shape
    kv_BT2Hc = F.linear(text_BTX, mat_kv.weight, torch.cat((zero_k_bias, v_bias))).view(B, T, 2, H, -1)
    k_BHTc, v_BHTc = kv_BT2Hc.permute(2, 0, 3, 1, 4).unbind(0)
    return k_BHTc, v_BHTc


class TextPool(nn.Module):
    """One learned query per head attends over the text: the pooled condition (B, D)."""

    def __init__(self, text_dim: int, dim: int, num_heads: int, bf16: bool):
        super().__init__()
        self.num_heads, self.bf16 = num_heads, bf16
        self.mat_q = nn.Parameter(torch.zeros(1, num_heads, dim // num_heads))
        self.mat_kv = nn.Linear(text_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, text_BTX: Tensor, keep_B11T: Tensor) -> Tensor:
        k_BHTc, v_BHTc = _kv_heads(text_BTX, self.mat_kv, self.v_bias, self.zero_k_bias, self.num_heads)
        q_BH1c = self.mat_q.expand(text_BTX.shape[0], -1, -1).unsqueeze(2)
        return self.proj(text_attention(q_BH1c, k_BHTc, v_BHTc, keep_B11T, self.bf16)).squeeze(1)


class TextPoolHolder(nn.Module):
    """Keeps the official key layout ``text_proj_for_sos.ca.*``."""

    def __init__(self, pool: TextPool):
        super().__init__()
        self.ca = pool


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, bf16: bool):
        super().__init__()
        self.num_heads, self.bf16 = num_heads, bf16
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the text (B, H, T, c), fixed for a whole rollout: computed once."""
        return _kv_heads(text_BTD, self.mat_kv, self.v_bias, self.zero_k_bias, self.num_heads)

    def forward(self, x_BlC: Tensor, kv: tuple[Tensor, Tensor], keep_B11T: Tensor) -> Tensor:
        B, l, _ = x_BlC.shape
        q_BHlc = self.mat_q(x_BlC).view(B, l, self.num_heads, -1).transpose(1, 2)
        return self.proj(text_attention(q_BHlc, *kv, keep_B11T, self.bf16))


class KVCache:
    """Keys and values of the scales so far (B, H, L, c), grown by concatenation."""

    def __init__(self) -> None:
        self.k_BHLc: Tensor | None = None
        self.v_BHLc: Tensor | None = None

    def append(self, k_BHlc: Tensor, v_BHlc: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_BHLc is None or self.v_BHLc is None:
            self.k_BHLc, self.v_BHLc = k_BHlc, v_BHlc
        else:
            self.k_BHLc = torch.cat((self.k_BHLc, k_BHlc), dim=2)
            self.v_BHLc = torch.cat((self.v_BHLc, v_BHlc), dim=2)
        return self.k_BHLc, self.v_BHLc

    def keep_rows(self, n: int) -> None:
        if self.k_BHLc is not None and self.v_BHLc is not None:
            self.k_BHLc, self.v_BHLc = self.k_BHLc[:n], self.v_BHLc[:n]


def rope_table(head_dim: int, side: int, last_side: int) -> Tensor:
    """Cos and sin (2, side², c/2) of one square scale: the first c/4 frequencies turn with the row, the last c/4
    with the column, at positions ``round(i · last_side / side)`` on the last map of the 1M schedule."""
    half = head_dim // 2
    inv_freq_f = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    pos_s = (torch.arange(side) * (last_side / side)).round().int().float()
    row_lf = torch.outer(pos_s, inv_freq_f).repeat_interleave(side, dim=0)
    col_lf = torch.outer(pos_s, inv_freq_f).repeat(side, 1)
    angles_lh = torch.cat((row_lf, col_lf), dim=-1)
    return torch.stack((angles_lh.cos(), angles_lh.sin()))


def apply_rope(x_BHlc: Tensor, table_2lh: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of q or k (B, H, l, c) by ``table_2lh`` (cos, sin), in float32."""
    x = x_BHlc.float().reshape(*x_BHlc.shape[:-1], -1, 2)
    cos_lh, sin_lh = table_2lh[0], table_2lh[1]
    out = torch.stack((cos_lh * x[..., 0] - sin_lh * x[..., 1], sin_lh * x[..., 0] + cos_lh * x[..., 1]), dim=-1)
    return out.reshape(x_BHlc.shape)


class SelfAttention(nn.Module):
    """Cosine self-attention with rotary positions over this scale and the cached ones."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BlC: Tensor, rope_2lh: Tensor, cache: KVCache) -> Tensor:
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, C // self.num_heads)
        q_BHlc, k_BHlc, v_BHlc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        q_BHlc = F.normalize(q_BHlc, dim=-1, eps=1e-12).mul(scale_mul)
        k_BHlc = F.normalize(k_BHlc, dim=-1, eps=1e-12)
        q_BHlc, k_BHlc = apply_rope(q_BHlc, rope_2lh), apply_rope(k_BHlc, rope_2lh)
        k_BHLc, v_BHLc = cache.append(k_BHlc, v_BHlc.contiguous())
        out_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHLc, v_BHLc, scale=1.0)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x_BlC: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_BlC), approximate="tanh"))


class Block(nn.Module):
    """AdaLN self-attention, cross-attention to the text (LayerNorm before it, no AdaLN), AdaLN FFN."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, cfg.num_heads, cfg.text_attn_bf16)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))

    def _norm(self, x_BlC: Tensor, scale_B1C: Tensor, shift_B1C: Tensor) -> Tensor:
        return F.layer_norm(x_BlC.float(), x_BlC.shape[-1:], eps=self.eps).mul(scale_B1C.add(1)).add_(shift_B1C)

    def forward(self, x_BlC: Tensor, text: TextState, kv: tuple[Tensor, Tensor], rope_2lh: Tensor,
                cache: KVCache) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + text.gss_B16C).unbind(2)
        x_BlC = x_BlC + self.sa(self._norm(x_BlC, scale1, shift1), rope_2lh, cache).mul_(gamma1)
        x_BlC = x_BlC + self.ca(self.ca_norm(x_BlC), kv, text.keep_B11T).float()
        return x_BlC + self.ffn(self._norm(x_BlC, scale2, shift2)).mul(gamma2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


class HeadNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC: Tensor, cond_BD: Tensor) -> Tensor:
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 1, 2, x_BlC.shape[-1]).unbind(2)
        return F.layer_norm(x_BlC, x_BlC.shape[-1:], eps=self.eps).mul(scale_B1C.add(1)).add_(shift_B1C)


@dataclass
class TextState:
    """The text side of a rollout: per-block keys and values, the padding mask, the pooled condition."""

    kvs: list[tuple[Tensor, Tensor]]   # per block (B, H, T, c) each
    keep_B11T: Tensor                  # True on each row's own tokens  # noqa: N815
    cond_BD: Tensor                    # (B, D) the pooled text: start token and AdaLN condition  # noqa: N815
    gss_B16C: Tensor                   # (B, 1, 6, C) the shared AdaLN projection of cond_BD  # noqa: N815

    def keep_rows(self, n: int) -> None:
        self.kvs = [(k[:n], v[:n]) for k, v in self.kvs]
        self.keep_B11T, self.cond_BD, self.gss_B16C = self.keep_B11T[:n], self.cond_BD[:n], self.gss_B16C[:n]


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, X = cfg.embed_dim, cfg.text_dim
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, X))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(X, cfg.norm_eps)
        self.text_proj_for_sos = TextPoolHolder(TextPool(X, C, cfg.pool_heads, cfg.text_attn_bf16))
        self.text_proj_for_ca = nn.Sequential(nn.Linear(X, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(LVL_EMBEDS, C)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.bits)
        self.ropes = [rope_table(cfg.head_dim, side, SQUARE_SIDES[-1]) for side in cfg.patch_nums]

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.patch_nums

    def encode_text(self, text_BTX: Tensor, lens_B: Tensor) -> TextState:
        """The text state of B rows of T5 features (B, T, X) (row i's first ``lens_B[i]`` tokens are its own)."""
        keep_BT = torch.arange(text_BTX.shape[1], device=text_BTX.device) < lens_B[:, None]
        normed_BTX = self.text_norm(text_BTX.float())
        keep_B11T = keep_BT[:, None, None, :]
        cond_BD = self.text_proj_for_sos.ca(normed_BTX, keep_B11T)
        text_BTD = self.text_proj_for_ca(normed_BTX)
        gss_B16C = self.shared_ada_lin(cond_BD.float()).float().reshape(-1, 1, 6, self.cfg.embed_dim)
        return TextState([b.ca.text_kv(text_BTD) for b in self.blocks], keep_B11T, cond_BD, gss_B16C)

    def uncond_text(self, lens_B: Tensor) -> Tensor:
        """The learned unconditional text (B, T, X): ``cfg_uncond`` cut to each prompt's own length."""
        T = int(lens_B.max())
        keep_BT1 = (torch.arange(T, device=lens_B.device) < lens_B[:, None])[..., None]
        return self.cfg_uncond[:T].expand(len(lens_B), -1, -1) * keep_BT1

    def first_input(self, text: TextState) -> Tensor:
        return text.cond_BD.unsqueeze(1) + self.pos_start

    def forward_scale(self, x_BlC: Tensor, k: int, text: TextState, caches: list[KVCache]) -> Tensor:
        """Hidden states of scale k (B, l, C) through every block, the level embedding added before the first
        block (or before every chunk)."""
        lvl_C = self.lvl_embed.weight[k]
        per_chunk = self.cfg.depth // self.cfg.block_chunks
        rope_2lh = self.ropes[k].to(x_BlC.device)
        for i, (block, kv, cache) in enumerate(zip(self.blocks, text.kvs, caches, strict=True)):
            if i == 0 or (self.cfg.lvl_embed_every_chunk and i % per_chunk == 0):
                x_BlC = x_BlC + lvl_C
            x_BlC = block(x_BlC, text, kv, rope_2lh, cache)
        return x_BlC

    def logits(self, x_BlC: Tensor, text: TextState) -> Tensor:
        """(B, l, 2·d) bit logits, a pair per bit."""
        return self.head(self.head_nm(x_BlC.float(), text.cond_BD.float()))


# ---- the BSQ tokenizer's decoder ---------------------------------------------------------------------------------

def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """The tokenizer's GroupNorm: 32 groups, or 24 when the width is not a multiple of 32."""
    groups = 32 if channels % 32 == 0 else 24
    if channels % groups:
        raise ValueError(f"a BSQ decoder width of {channels} is not a multiple of 32 or 24")
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return self.nin_shortcut(x) + h


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


@dataclass(frozen=True)
class BSQDecoderConfig:
    bits: int = 32                                    # z channels
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    upsample_levels: tuple[int, ...] = (1, 2, 3, 4)  # levels ending in a 2x upsampling (patch 16: four)


class BSQDecoder(nn.Module):
    """The tokenizer's decoder (flux VQGAN layout): bits' codes (B, d, h, w) -> image (B, 3, p·h, p·w) in [-1, 1],
    p = 2 ** (upsampling levels): 16 for the 2B's VAE (``ch_mult`` 1, 2, 4, 4, 4), 8 for the 8B's (1, 2, 4, 4)."""

    def __init__(self, cfg: BSQDecoderConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.bits, c, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.block_2 = ResBlock(c, c), ResBlock(c, c)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c, cfg.ch * cfg.ch_mult[i]))
                c = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(blocks)
            if i in cfg.upsample_levels:
                level.upsample = Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z_BdHW: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z_BdHW)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h))).clamp(-1, 1)


def bits_to_codes(bits_Bhwd: Tensor) -> Tensor:
    """BSQ codes (B, d, 1, h, w) of bits (B, h, w, d) in {0, 1}: ±1/√d, L2-normalised (as the tokenizer)."""
    scale = 1 / math.sqrt(bits_Bhwd.shape[-1])
    codes_Bhwd = F.normalize(bits_Bhwd.float() * scale * 2 - scale, dim=-1)
    return codes_Bhwd.permute(0, 3, 1, 2).unsqueeze(2)


def bits_of(idx_Bl: Tensor, d: int) -> Tensor:
    """The d bits (B, l, d) of token indices, most significant first."""
    shifts_d = torch.arange(d - 1, -1, -1, device=idx_Bl.device)
    return (idx_Bl[..., None] >> shifts_d) & 1


# ---- the rollout and the backbone ---------------------------------------------------------------------------------

class InfinityRollout(Alternation):
    """Sampling state of one batch (implements :class:`pipeline.backbones.base.Rollout`; 2B rows until
    :meth:`drop_uncond`, conditional first). ``tau_K`` multiplies the logits of scale k by ``1/tau_k``; ``patch``
    is the side of the VAE's codes in one token (2: spatial patchify, the VAE's maps are twice as large)."""

    def __init__(self, model: Infinity, decoder: BSQDecoder, text: TextState, tau_K: Sequence[float], patch: int):
        super().__init__(text.cond_BD.shape[0] // 2, model.first_input(text))
        self.model, self.decoder, self.text, self.tau_K, self.patch = model, decoder, text, tuple(tau_K), patch
        self.caches = [KVCache() for _ in model.blocks]
        self.summed_Bd1HW: Tensor | None = None

    @torch.no_grad()
    def drop_uncond(self) -> None:
        if self.pending:
            raise RuntimeError("drop_uncond() between take() and the next logits()")
        if self.dropped:
            return
        self.text.keep_rows(self.B)
        for cache in self.caches:
            cache.keep_rows(self.B)
        if self.x_BlC is not None:
            self.x_BlC = self.x_BlC[:self.B]
        self.dropped = True

    @torch.no_grad()
    def logits(self) -> tuple[Tensor, Tensor | None]:
        hidden_BlC = self.model.forward_scale(self._input(), self.k, self.text, self.caches)
        return self._give(self.model.logits(hidden_BlC, self.text).mul(1 / self.tau_K[self.k]))

    @torch.no_grad()
    def take(self, idx_Bl: Tensor) -> None:
        self._check_take()
        sides, K, p = self.model.patch_nums, len(self.model.patch_nums), self.patch
        side = sides[self.k]
        bits_BDhw = bits_of(idx_Bl, self.model.cfg.bits).view(self.B, side, side, -1).permute(0, 3, 1, 2)
        bits_Bdhw = F.pixel_shuffle(bits_BDhw, p)           # a token's p x p codes (p = 1: the token's own)
        codes_Bd1hw = bits_to_codes(bits_Bdhw.permute(0, 2, 3, 1))
        last = (1, p * sides[-1], p * sides[-1])
        if self.k == K - 1:
            self.summed_Bd1HW = codes_Bd1hw if self.summed_Bd1HW is None else self.summed_Bd1HW + codes_Bd1hw
        else:
            up_Bd1HW = F.interpolate(codes_Bd1hw, size=last, mode="trilinear")
            self.summed_Bd1HW = up_Bd1HW if self.summed_Bd1HW is None else self.summed_Bd1HW + up_Bd1HW
        if not self._advance(K):
            return
        nxt = p * sides[self.k]
        next_Bdhw = F.interpolate(self.summed_Bd1HW, size=(1, nxt, nxt), mode="trilinear").squeeze(-3)
        next_BDl = F.pixel_unshuffle(next_Bdhw, p).flatten(2)
        self._set_input(self.model.word_embed(next_BDl.permute(0, 2, 1)))

    @torch.no_grad()
    def decode(self) -> Tensor:
        if self.summed_Bd1HW is None or self.k < len(self.model.patch_nums):
            raise RuntimeError(f"decode() after all {len(self.model.patch_nums)} scales; at scale {self.k}")
        return self.decoder(self.summed_Bd1HW.squeeze(-3)).add(1).div(2)


class T5Text:
    """A T5 encoder and its tokenizer: prompts truncated to ``max_length`` tokens (the official 512), padded to the
    longest prompt of the batch. The official code pads to 512; the padding is masked out of every attention, so the
    prompts' own features are the same (tested against the official encoding) at a fraction of the cost, up to the
    float32 rounding (8e-7), which can move a bfloat16 rounding of the cross-attention and so, rarely, a bit.
    ``pad_to_max_length`` pads as the official code (its bits exactly, at the full cost)."""

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int, pad_to_max_length: bool = False):
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder.eval().requires_grad_(False), max_length
        self.padding = "max_length" if pad_to_max_length else "longest"

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Features (B, T, X) float32 cut to the longest prompt's T tokens, and each prompt's length (B,)."""
        tokens = self.tokenizer(text=list(prompts), max_length=self.max_length, padding=self.padding,
                                truncation=True, return_tensors="pt")
        mask_BT = tokens.attention_mask.to(self.device)
        states_BTX = self.encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask_BT
                                  )["last_hidden_state"].float()
        lens_B = mask_BT.sum(dim=-1)
        return states_BTX[:, :int(lens_B.max())], lens_B


def spatial_patch(token_bits: int, vae_bits: int) -> int:
    """The side of the VAE's codes in one token: 1 when a token is one d-bit code, 2 when it is a 2 x 2 patch of them
    (4·d bits: Infinity-8B's ``apply_spatial_patchify=1``)."""
    if token_bits not in (vae_bits, 4 * vae_bits):
        raise ValueError(f"the transformer's tokens hold {token_bits} bits, the VAE's codes {vae_bits}: a token is one "
                         f"code (d bits) or a 2 x 2 patch of them (4·d, apply_spatial_patchify); pass the VAE of this "
                         "transformer (Infinity-2B: infinity_vae_d32reg.pth, 8B: infinity_vae_d56_f8_14_patchify.pth)")
    return 1 if token_bits == vae_bits else 2


def _pad_cat(a_BTX: Tensor, b_BTX: Tensor) -> Tensor:
    T = max(a_BTX.shape[1], b_BTX.shape[1])
    return torch.cat([F.pad(t, (0, 0, 0, T - t.shape[1])) for t in (a_BTX, b_BTX)])


class InfinityBackbone:
    """The Infinity transformer, its BSQ decoder and T5 (implements ``BitwiseBackbone``).

    ``tau``: the temperature, one for every scale or one per scale (the official ``tau_list``); ``negative_prompt``:
    the unconditional branch encodes it instead of using the learned ``cfg_uncond``.
    """

    def __init__(self, model: Infinity, decoder: BSQDecoder, text: T5Text, *, tau: float | Sequence[float] = 1.0,
                 negative_prompt: str | None = None):
        self.patch = spatial_patch(model.cfg.bits, decoder.cfg.bits)
        self.model, self.decoder, self.text = model, decoder, text
        K = len(model.patch_nums)
        tau_K = [float(tau)] * K if isinstance(tau, int | float) else [float(t) for t in tau]
        if len(tau_K) != K or not all(math.isfinite(t) and t > 0 for t in tau_K):
            raise ValueError(f"tau={tau!r}: give one positive temperature, or one per scale ({K})")
        self.tau_K, self.negative_prompt = tau_K, negative_prompt

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.model.patch_nums

    @property
    def vocab_size(self) -> int:
        return 2 ** self.model.cfg.bits

    @property
    def bits_per_token(self) -> int:
        return self.model.cfg.bits

    @property
    def null_prompt(self) -> str:
        """The negative prompt, or "" for the learned unconditional embedding."""
        return self.negative_prompt or ""

    @property
    def device(self) -> torch.device:
        return self.model.pos_start.device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextState:
        """The 2B rows of a batch: the prompts, then the unconditional branch (learned or negative prompt)."""
        cond_BTX, lens_B = self.text.encode(prompts)
        if self.negative_prompt:
            neg_BTX, neg_lens_B = self.text.encode([self.negative_prompt] * len(prompts))
        else:
            neg_BTX, neg_lens_B = self.model.uncond_text(lens_B), lens_B
        return self.model.encode_text(_pad_cat(cond_BTX, neg_BTX), torch.cat((lens_B, neg_lens_B)))

    @torch.no_grad()
    def start(self, prompts: Sequence[str]) -> InfinityRollout:
        return InfinityRollout(self.model, self.decoder, self.encode(prompts), self.tau_K, self.patch)

    def to(self, device: torch.device | str) -> InfinityBackbone:
        self.model.to(device)
        self.decoder.to(device)
        self.text.encoder.to(device)
        return self


# ---- loading the released files -----------------------------------------------------------------------------------

_CHUNKED = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_WRAPPED = re.compile(r"^(.*(?:conv_in|conv_out|conv\d|nin_shortcut|upsample\.conv|norm\d|norm_out))\.(?:conv|norm)\."
                      r"(weight|bias)$")


def infinity_config_from_state_dict(sd: dict[str, Tensor], patch_nums: Sequence[int]) -> InfinityConfig:
    """The transformer's hyper-parameters from its tensors (the chunks from the ``block_chunks.{c}`` keys; the bits
    per token from ``word_embed``: 4·d with spatial patchify). KeyError names a tensor it needs and lacks."""
    blocks = {(int(m[1]), int(m[2])) for m in map(_CHUNKED.match, sd) if m}
    if not blocks:
        raise KeyError("block_chunks.0.module.0.*")
    chunks = 1 + max(c for c, _ in blocks)
    prefix = "block_chunks.0.module.0."
    return InfinityConfig(
        embed_dim=sd["pos_start"].shape[-1], depth=len(blocks), block_chunks=chunks,
        num_heads=sd[prefix + "sa.scale_mul_1H11"].shape[1], mlp_hidden=sd[prefix + "ffn.fc1.weight"].shape[0],
        bits=sd["word_embed.weight"].shape[1], text_dim=sd["text_norm.weight"].shape[0],
        text_maxlen=sd["cfg_uncond"].shape[0], pool_heads=sd["text_proj_for_sos.ca.mat_q"].shape[1],
        patch_nums=tuple(patch_nums))


def unchunk(sd: dict[str, Tensor], cfg: InfinityConfig) -> dict[str, Tensor]:
    """``block_chunks.{c}.module.{j}.*`` -> ``blocks.{c·n + j}.*`` (n blocks a chunk); other keys unchanged."""
    per_chunk = cfg.depth // cfg.block_chunks
    out = {}
    for key, value in sd.items():
        m = _CHUNKED.match(key)
        out[f"blocks.{int(m[1]) * per_chunk + int(m[2])}.{m[3]}" if m else key] = value
    return out


def decoder_state_dict(vae_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The decoder's tensors of a BSQ VAE state dict, in :class:`BSQDecoder`'s layout: ``decoder.`` removed and the
    official wrappers' ``.conv.`` / ``.norm.`` level dropped (both layouts occur: the official loader accepts
    either). The encoder and the quantizer's constant ``mask`` are not used."""
    return {_WRAPPED.sub(r"\1.\2", k[len("decoder."):]): v for k, v in vae_sd.items() if k.startswith("decoder.")}


def bsq_config_from_state_dict(sd: dict[str, Tensor]) -> BSQDecoderConfig:
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("up."))
    ch = sd["conv_out.weight"].shape[1]
    return BSQDecoderConfig(
        bits=sd["conv_in.weight"].shape[1], ch=ch,
        ch_mult=tuple(sd[f"up.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
        num_res_blocks=sum(1 for k in sd if re.match(r"^up\.0\.block\.\d+\.conv1\.weight$", k)) - 1,
        upsample_levels=tuple(i for i in range(levels) if f"up.{i}.upsample.conv.weight" in sd))


def _strict(model: nn.Module, sd: dict[str, Tensor], role: str, path: str | Path) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = [f"{what} {len(keys)}: {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError(f"{role} {path}: not the layout inferred from it ({'; '.join(problems)})")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def load_infinity_model(path: str | Path, patch_nums: Sequence[int] = square_schedule("1M"),
                        lvl_embed_every_chunk: bool = False, text_attn_bf16: bool = True) -> Infinity:
    """The transformer of a state dict (a .pth, or a folder of shards with an index JSON, as the 8B's), to sample at
    the square schedule ``patch_nums`` (:func:`square_schedule`: the resolution is a sampling choice, not in the
    checkpoint)."""
    sd = load_state_dict(path, what="var_ckpt", fix="pass Infinity's .pth (infinity_2b_reg.pth) or the folder of "
                         "its shards (infinity_8b_weights)")
    try:
        cfg = infinity_config_from_state_dict(sd, patch_nums)
    except KeyError as e:
        raise ValueError(f"var_ckpt {path}: not an Infinity state dict (no {e.args[0]})") from None
    cfg = InfinityConfig(**{**cfg.__dict__, "lvl_embed_every_chunk": lvl_embed_every_chunk,
                            "text_attn_bf16": text_attn_bf16})
    model = Infinity(cfg)
    _strict(model, unchunk(sd, cfg), "var_ckpt", path)
    return model.eval().requires_grad_(False)


def load_bsq_decoder(path: str | Path) -> BSQDecoder:
    sd = load_weights(path, what="vae_ckpt", fix="pass Infinity's VAE (infinity_vae_d32reg.pth, "
                      "infinity_vae_d56_f8_14_patchify.pth)")
    vae_sd = sd.get("vae", sd) if isinstance(sd, dict) else None
    if not isinstance(vae_sd, dict) or not any(k.startswith("decoder.") for k in vae_sd):
        raise ValueError(f"vae_ckpt {path}: not a BSQ VAE state dict (no decoder.* tensors)")
    dec_sd = decoder_state_dict(vae_sd)
    decoder = BSQDecoder(bsq_config_from_state_dict(dec_sd))
    _strict(decoder, dec_sd, "vae_ckpt", path)
    return decoder.eval().requires_grad_(False)


def load_t5(folder: str | Path, max_length: int) -> T5Text:
    """flan-t5-xl's tokenizer and encoder (float32) from a local folder; never the network."""
    from transformers import AutoTokenizer, T5EncoderModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"text_encoder {folder}: no config.json; pass a local copy of google/flan-t5-xl")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True).float()
    return T5Text(tokenizer, encoder, max_length)


def load_infinity(infinity_ckpt: str | Path, vae_ckpt: str | Path, text_encoder: str | Path, *,
                  patch_nums: Sequence[int] = square_schedule("1M"), device: str | torch.device = "cpu",
                  tau: float | Sequence[float] = 1.0,
                  negative_prompt: str | None = None, lvl_embed_every_chunk: bool = False,
                  text_attn_bf16: bool = True) -> InfinityBackbone:
    """Load Infinity (``infinity_2b_reg.pth``, or the 8B's folder of shards), its VAE (any released file name) and a
    local flan-t5-xl folder. Spatial patchify (8B) follows from the two: the transformer's tokens hold 4x the VAE's
    bits.

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    model = load_infinity_model(infinity_ckpt, patch_nums, lvl_embed_every_chunk, text_attn_bf16)
    text = load_t5(text_encoder, model.cfg.text_maxlen)
    if text.encoder.config.d_model != model.cfg.text_dim:
        raise ValueError(f"text_encoder {text_encoder}: width {text.encoder.config.d_model}, the transformer "
                         f"expects {model.cfg.text_dim} (flan-t5-xl)")
    return InfinityBackbone(model, load_bsq_decoder(vae_ckpt), text, tau=tau,
                            negative_prompt=negative_prompt).to(device)
