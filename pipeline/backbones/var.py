"""VAR: the class-conditional next-scale-prediction transformer, and the backbone that samples with it.

Our own implementation of "Visual Autoregressive Modeling" (Tian et al., 2024) in the official key layout, so that
``load_var`` reads the released ``var_d{16,20,24,30,36}.pth`` (and any smaller or larger state dict of the same
form) with ``strict=True``, inferring every hyper-parameter from the tensors.

Shapes: B batch (2B for the conditional + unconditional sampling batch), L = Σ pn² tokens of all scales, l the tokens
of one scale, C embed width, D = C conditioning width, H heads of c = C/H channels, V vocabulary, Cvae latent
channels.

The transformer sees, at scale k, the tokens of that scale: scale 0 is the class embedding plus ``pos_start``;
scale k > 0 is ``word_embed`` of f_hat (the sum of the previous scales' codes) area-downsampled to pn_k x pn_k.
Each AdaLN block modulates a LayerNorm without affine by six vectors computed from the class embedding; attention
uses L2-normalised q and k, q scaled per head by exp(min(scale_mul, ln 100)) and a softmax scale of 1. Training is
block-causal (a token sees every token of its scale and of the coarser ones); sampling uses a KV cache instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.backbones.base import Alternation
from pipeline.backbones.vqvae import VQVAE, VQVAEConfig, count_indexed, vqvae_config_from_state_dict
from pipeline.data.files import load_state_dict

MAX_SCALE_MUL = math.log(100.0)   # the learned per-head q scale is clamped to at most 100
T = TypeVar("T")
Modulation = tuple[Tensor, ...]   # AdaLN vectors of one block (or the head), each (B, 1, C)


@dataclass(frozen=True)
class VARConfig:
    """Hyper-parameters of the transformer; the defaults are the official ``var_d16.pth``."""

    vocab_size: int = 4096
    z_channels: int = 32                    # Cvae of the tokenizer
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    shared_aln: bool = False                # one AdaLN projection shared by all blocks (d36 at 512 px)
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1             # training: probability of replacing a label by the null class
    drop_path_rate: float = 0.0             # training: stochastic depth of the last block (linear from 0)
    init_std: float | None = None           # initialisation; None: sqrt(1 / (3 C)) as in VAR
    init_head: float = 0.02
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if len(self.patch_nums) < 2 or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:], strict=False)):
            raise ValueError(f"patch_nums={self.patch_nums}: need at least 2 strictly increasing scales")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}")

    @classmethod
    def official(cls, depth: int, **overrides) -> VARConfig:
        """VAR-d{depth}: width 64·depth, depth heads, stochastic depth 0.1·depth/24 (as VAR's build_vae_var)."""
        return cls(**{"depth": depth, "embed_dim": 64 * depth, "num_heads": depth,
                      "drop_path_rate": 0.1 * depth / 24, **overrides})

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


class KVCache:
    """Keys and values of the tokens seen so far by one attention layer, preallocated for all L tokens."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k_BHLc: Tensor | None = None
        self.v_BHLc: Tensor | None = None

    def append(self, k_BHlc: Tensor, v_BHlc: Tensor) -> tuple[Tensor, Tensor]:
        """Store this scale's keys and values; return those of every token so far, (B, H, length, c)."""
        if self.k_BHLc is None:
            B, H, _, c = k_BHlc.shape
            self.k_BHLc = k_BHlc.new_empty(B, H, self.capacity, c)
            self.v_BHLc = v_BHlc.new_empty(B, H, self.capacity, c)
        end = self.length + k_BHlc.shape[2]
        self.k_BHLc[:, :, self.length:end] = k_BHlc
        self.v_BHLc[:, :, self.length:end] = v_BHlc
        self.length = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]

    def keep_rows(self, n: int) -> None:
        """Keep the first n rows of the batch (the conditional half), freeing the others."""
        if self.k_BHLc is not None:
            self.k_BHLc, self.v_BHLc = self.k_BHLc[:n].clone(), self.v_BHLc[:n].clone()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BlC: Tensor, attn_bias: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, self.head_dim)
        q_BHlc, k_BHlc, v_BHlc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHlc = F.normalize(q_BHlc, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
        k_BHlc = F.normalize(k_BHlc, dim=-1)
        if cache is not None:
            k_BHlc, v_BHlc = cache.append(k_BHlc, v_BHlc)
        mask = None if attn_bias is None else attn_bias.to(q_BHlc.dtype)
        out_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHlc, v_BHlc, attn_mask=mask, scale=1.0)
        return self.proj(out_BHlc.transpose(1, 2).reshape(B, l, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BlC: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_BlC), approximate="tanh"))


def drop_path(x_BlC: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch for a random fraction p of the samples (rescaled)."""
    if p == 0.0 or not training:
        return x_BlC
    keep_B11 = x_BlC.new_empty(x_BlC.shape[0], 1, 1).bernoulli_(1 - p)
    return x_BlC * keep_B11 / (1 - p)


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose two LayerNorms are modulated (scale, shift, gate) by the class condition."""

    def __init__(self, cfg: VARConfig, drop_path_p: float):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.shared_aln, self.drop_path_p = C, cfg.shared_aln, drop_path_p
        self.attn = SelfAttention(C, cfg.num_heads)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / math.sqrt(C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: Tensor) -> Modulation:
        """gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2, each (B, 1, C), from the class embedding (B, D)
        or, with shared AdaLN, from the shared projection (B, 1, 6, C). Fixed for a batch: sampling computes it
        once for all scales."""
        gss_B16C = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = gss_B16C.unbind(2)
        return gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2

    def forward(self, x_BlC: Tensor, mod: Modulation, attn_bias: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        gamma1, gamma2, scale1p, scale2p, shift1, shift2 = mod
        attn = self.attn(self.ln_wo_grad(x_BlC).mul(scale1p).add_(shift1), attn_bias, cache).mul_(gamma1)
        x_BlC = x_BlC + drop_path(attn, self.drop_path_p, self.training)
        ffn = self.ffn(self.ln_wo_grad(x_BlC).mul(scale2p).add_(shift2)).mul_(gamma2)
        return x_BlC + drop_path(ffn, self.drop_path_p, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def modulation(self, cond_BD: Tensor) -> Modulation:
        """1 + scale, shift, each (B, 1, C)."""
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return scale.add(1), shift

    def forward(self, x_BlC: Tensor, mod: Modulation) -> Tensor:
        scale_p, shift = mod
        return self.ln_wo_grad(x_BlC).mul(scale_p).add_(shift)


class SharedAdaLin(nn.Linear):
    """The shared AdaLN projection: (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: Tensor) -> Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class VAR(nn.Module):
    """The transformer alone (the tokenizer is a separate :class:`VQVAE`), in the official key layout."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L, K = cfg.embed_dim, cfg.L, len(cfg.patch_nums)
        self.num_classes, self.patch_nums, self.L = cfg.num_classes, cfg.patch_nums, L
        self.first_l = cfg.patch_nums[0] ** 2
        self.begin_ends = []
        begin = 0
        for pn in cfg.patch_nums:
            self.begin_ends.append((begin, begin + pn * pn))
            begin += pn * pn

        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)     # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(K, C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        drop_p = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, p) for p in drop_p)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        lvl_L = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L[None].clone())
        visible_LL = lvl_L[:, None] >= lvl_L[None, :]     # block-causal: same or coarser scale
        self.register_buffer("attn_bias_for_masking",
                             torch.zeros(1, 1, L, L).masked_fill(~visible_LL, float("-inf")))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """VAR's initialisation (truncated normals, small head and AdaLN gates, depth-scaled output layers)."""
        cfg = self.cfg
        std = cfg.init_std if cfg.init_std is not None else math.sqrt(1 / cfg.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        C = cfg.embed_dim
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))
            gss = block.ada_gss.view(6, C) if cfg.shared_aln else block.ada_lin[-1].weight.view(6, C, -1)
            gss[2:].mul_(cfg.init_adaln)
            gss[:2].mul_(cfg.init_adaln_gamma)

    def lvl_pos(self, k: int) -> Tensor:
        """Level + position embedding of the tokens of scale k, (1, l, C)."""
        begin, end = self.begin_ends[k]
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def start_tokens(self, cond_BD: Tensor) -> Tensor:
        """Class embedding (B, D) + pos_start: the scale-0 tokens before level/position embedding, (B, pn_0², C)."""
        B = cond_BD.shape[0]
        return cond_BD[:, None].expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)

    def first_input(self, cond_BD: Tensor) -> Tensor:
        """Input tokens of scale 0 from the class embedding (B, D): (B, pn_0², C)."""
        return self.start_tokens(cond_BD) + self.lvl_pos(0)

    def scale_input(self, k: int, next_BCvhw: Tensor) -> Tensor:
        """Input tokens of scale k > 0 from f_hat downsampled to its pn x pn, (B, Cvae, pn, pn) -> (B, pn², C)."""
        return self.word_embed(next_BCvhw.flatten(2).transpose(1, 2)) + self.lvl_pos(k)

    def logits(self, x_BlC: Tensor, head_mod: Modulation) -> Tensor:
        """Output tokens (B, l, C) -> logits (B, l, V) float32."""
        return self.head(self.head_nm(x_BlC.float(), head_mod).float()).float()

    def forward(self, label_B: Tensor, x_BLCvae_wo_first_l: Tensor) -> Tensor:
        """Teacher-forced training forward.

        Args:
            label_B: class labels (B,) int64; in training mode each is replaced by the null class with
                probability ``cond_drop_rate``.
            x_BLCvae_wo_first_l: (B, L - pn_0², Cvae) from :meth:`VQVAE.idxBl_to_var_input`.

        Returns:
            logits (B, L, V) float32; row block k predicts the tokens of scale k.
        """
        if self.training and self.cfg.cond_drop_rate > 0:
            drop_B = torch.rand(label_B.shape[0], device=label_B.device) < self.cfg.cond_drop_rate
            label_B = label_B.masked_fill(drop_B, self.num_classes)
        cond_BD = self.class_emb(label_B)
        x_BLC = torch.cat((self.start_tokens(cond_BD), self.word_embed(x_BLCvae_wo_first_l.float())), dim=1)
        x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L) + self.pos_1LC)
        shared = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, block.modulation(shared), self.attn_bias_for_masking)
        return self.logits(x_BLC, self.head_nm.modulation(cond_BD))


class ScaleRollout(Alternation):
    """The scale-by-scale bookkeeping of a rollout over a 2B batch (B conditional rows, then B unconditional):
    logits / take alternation, the VQVAE's running f_hat, the next scale's input and dropping the unconditional half.
    Shared by VAR and Switti (implements :class:`pipeline.backbones.base.Rollout`); a subclass runs its transformer
    in :meth:`_forward` and drops its own per-row state (caches, text) in :meth:`_keep_rows`.

    ``model`` has ``patch_nums``, ``scale_input(k, next_BChw)`` and ``logits(x, head_mod)``; ``mods`` (per block)
    and ``head_mod`` are tuples of (2B, ...) modulation tensors; ``first_2BlC`` is the first scale's input.
    """

    def __init__(self, vae: VQVAE, model: nn.Module, cond_2BD: Tensor, mods: list[tuple[Tensor, ...]],
                 head_mod: tuple[Tensor, ...], first_2BlC: Tensor):
        super().__init__(cond_2BD.shape[0] // 2, first_2BlC)
        self.vae, self.model = vae, model
        self.mods, self.head_mod = mods, head_mod   # the condition is fixed: computed once
        side = model.patch_nums[-1]
        self.f_hat_BChw = cond_2BD.new_zeros(self.B, vae.Cvae, side, side, dtype=torch.float32)

    def _forward(self, x_BlC: Tensor) -> Tensor:
        """The transformer's blocks on the current scale's input (rows, l, C) -> hidden states (rows, l, C)."""
        raise NotImplementedError

    def _keep_rows(self, B: int) -> None:
        """Keep the first B rows of the subclass's per-row state (KV caches, text)."""
        raise NotImplementedError

    @torch.no_grad()
    def drop_uncond(self) -> None:
        """From the next scale on, run the B conditional rows only (their caches and modulation)."""
        if self.pending:
            raise RuntimeError("drop_uncond() between take() and the next logits()")
        if self.dropped:
            return
        B = self.B
        self.mods = [tuple(m[:B] for m in mod) for mod in self.mods]
        self.head_mod = tuple(m[:B] for m in self.head_mod)
        self._keep_rows(B)
        if self.x_BlC is not None:
            self.x_BlC = self.x_BlC[:B]
        self.dropped = True

    @torch.no_grad()
    def logits(self) -> tuple[Tensor, Tensor | None]:
        return self._give(self.model.logits(self._forward(self._input()), self.head_mod))

    @torch.no_grad()
    def take(self, idx_Bl: Tensor) -> None:
        self._check_take()
        K = len(self.model.patch_nums)
        h_BChw = self.vae.quantize.code_map(idx_Bl)
        self.f_hat_BChw, next_BChw = self.vae.get_next_autoregressive_input(self.k, K, self.f_hat_BChw, h_BChw)
        if self._advance(K):
            self._set_input(self.model.scale_input(self.k, next_BChw))

    @torch.no_grad()
    def decode(self) -> Tensor:
        if self.k < len(self.model.patch_nums):
            raise RuntimeError(f"decode() after all {len(self.model.patch_nums)} scales; at scale {self.k}")
        return self.vae.fhat_to_img(self.f_hat_BChw).add(1).mul(0.5)


class VARRollout(ScaleRollout):
    """KV-cached sampling state of one batch of class labels."""

    def __init__(self, vae: VQVAE, var: VAR, labels_B: Tensor):
        cond_2BD = var.class_emb(torch.cat((labels_B, torch.full_like(labels_B, var.num_classes))))
        shared = var.shared_ada_lin(cond_2BD)
        super().__init__(vae, var, cond_2BD, [block.modulation(shared) for block in var.blocks],
                         var.head_nm.modulation(cond_2BD), var.first_input(cond_2BD))
        self.caches = [KVCache(var.L) for _ in var.blocks]

    def _forward(self, x_BlC: Tensor) -> Tensor:
        for block, mod, cache in zip(self.model.blocks, self.mods, self.caches, strict=True):
            x_BlC = block(x_BlC, mod, cache=cache)
        return x_BlC

    def _keep_rows(self, B: int) -> None:
        for cache in self.caches:
            cache.keep_rows(B)


def check_fit(vae: VQVAE, name: str, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...]) -> None:
    """ValueError unless the tokenizer `vae` fits the transformer `name` (its vocabulary, Cvae and scales)."""
    if (vae.vocab_size, vae.Cvae, tuple(vae.patch_nums)) != (vocab_size, z_channels, tuple(patch_nums)):
        raise ValueError(
            f"VAE (vocab {vae.vocab_size}, Cvae {vae.Cvae}, patch_nums {vae.patch_nums}) and {name} (vocab "
            f"{vocab_size}, Cvae {z_channels}, patch_nums {patch_nums}) do not fit")


class VARBackbone:
    """A VQVAE and a VAR transformer that fit each other (implements ``ScaleWiseBackbone``)."""

    def __init__(self, vae: VQVAE, var: VAR):
        check_fit(vae, "VAR", var.cfg.vocab_size, var.cfg.z_channels, var.patch_nums)
        self.vae, self.var = vae, var

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.var.patch_nums

    @property
    def vocab_size(self) -> int:
        return self.var.cfg.vocab_size

    @property
    def num_classes(self) -> int:
        return self.var.num_classes

    @property
    def device(self) -> torch.device:
        return self.var.pos_start.device

    @torch.no_grad()
    def start(self, labels_B: Tensor) -> VARRollout:
        return VARRollout(self.vae, self.var, labels_B)

    def to(self, device: torch.device | str) -> VARBackbone:
        self.vae.to(device)
        self.var.to(device)
        return self

    def save(self, vae_ckpt: str | Path, var_ckpt: str | Path) -> None:
        """Write both halves as plain state dicts in the official layout (what :func:`load_var` reads)."""
        torch.save(self.vae.state_dict(), vae_ckpt)
        torch.save(self.var.state_dict(), var_ckpt)


def random_var(vae_cfg: VQVAEConfig, var_cfg: VARConfig, *, seed: int = 0) -> VARBackbone:
    """A backbone with random weights whose logits are spread out (unlike VAR's near-uniform initial head).

    For tests and benchmarks: every matrix ~ N(0, 1/fan_in), every vector ~ N(0, 0.02²), the codebook ~ N(0, 1);
    the per-head q scales keep their initial ln 4. Seeded, independent of torch's global random state.
    """
    if (vae_cfg.vocab_size, vae_cfg.z_channels, vae_cfg.patch_nums) != (
            var_cfg.vocab_size, var_cfg.z_channels, var_cfg.patch_nums):
        raise ValueError("vae_cfg and var_cfg must agree on vocab_size, z_channels and patch_nums")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae, var = VQVAE(vae_cfg), VAR(var_cfg)
        with torch.no_grad():
            for name, p in var.named_parameters():
                if not name.endswith("scale_mul_1H11"):
                    p.normal_(0, 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.02)
            vae.quantize.embedding.weight.normal_()
    return VARBackbone(vae, var.eval().requires_grad_(False))


def var_config_from_state_dict(sd: dict[str, Tensor]) -> VARConfig:
    """Infer the transformer's hyper-parameters from an official-layout state dict (KeyError if a key is absent).

    patch_nums come from ``lvl_1L`` (the scale id of each token: scale k has pn_k² tokens).
    """
    lvl_L = sd["lvl_1L"].flatten().long()
    counts = torch.bincount(lvl_L).tolist()
    patch_nums = tuple(math.isqrt(n) for n in counts)
    if not torch.equal(lvl_L, lvl_L.sort().values) or any(pn * pn != n for pn, n in zip(patch_nums, counts,
                                                                                           strict=True)):
        raise ValueError(f"lvl_1L does not hold square token maps in scale order (tokens per scale {counts})")
    embed_dim = sd["pos_start"].shape[2]
    return VARConfig(
        vocab_size=sd["head.weight"].shape[0],
        z_channels=sd["word_embed.weight"].shape[1],
        num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1],
        depth=count_indexed(sd, "blocks.{}.attn.scale_mul_1H11"),
        embed_dim=embed_dim,
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / embed_dim,
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        patch_nums=patch_nums,
        shared_aln="shared_ada_lin.1.weight" in sd,
    )


def _infer(infer: Callable[..., T], role: str, path: str | Path, kind: str, *args: object) -> T:
    """Run a config inference; any failure becomes one ValueError naming the file."""
    try:
        return infer(*args)
    except KeyError as e:
        raise ValueError(f"{role} {path}: not a {kind} state dict (missing {e.args[0]})") from None
    except (ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"{role} {path}: cannot infer the {kind} hyper-parameters ({e})") from None


def _check_layout(model: nn.Module, sd: dict[str, Tensor], role: str, path: str | Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected if k in sd
             and tuple(sd[k].shape) != expected[k]]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + \
               ([f"shape {', '.join(wrong[:3])}"] if wrong else [])
    if problems:
        raise ValueError(f"{role} {path}: does not match the layout inferred from it ({'; '.join(problems)})")


def load_var(vae_ckpt: str | Path, var_ckpt: str | Path, device: str | torch.device = "cpu") -> VARBackbone:
    """Load an official-format VQVAE + VAR pair (plain state dicts), inferring every hyper-parameter.

    Raises:
        ValueError: a file is missing, is not a tensor state dict, is not of its kind, or the two do not fit
            (vocabulary or latent channels differ), naming the file and the mismatch.
    """
    vae_sd = load_state_dict(vae_ckpt, what="vae_ckpt", fix="pass the official .pth state dict")
    var_sd = load_state_dict(var_ckpt, what="var_ckpt", fix="pass the official .pth state dict")
    var_cfg = _infer(var_config_from_state_dict, "var_ckpt", var_ckpt, "VAR", var_sd)
    vae_cfg = _infer(vqvae_config_from_state_dict, "vae_ckpt", vae_ckpt, "VQVAE", vae_sd, var_cfg.patch_nums)
    if (vae_cfg.vocab_size, vae_cfg.z_channels) != (var_cfg.vocab_size, var_cfg.z_channels):
        raise ValueError(f"vae_ckpt {vae_ckpt} (vocabulary {vae_cfg.vocab_size}, Cvae {vae_cfg.z_channels}) does not "
                         f"fit var_ckpt {var_ckpt} (vocabulary {var_cfg.vocab_size}, Cvae {var_cfg.z_channels}): "
                         "pass the matching pair")
    with torch.device("meta"):
        vae, var = VQVAE(vae_cfg), VAR(var_cfg)
    ema = "quantize.ema_vocab_hit_SV"
    if ema in vae_sd and vae_sd[ema].shape != vae.quantize.ema_vocab_hit_SV.shape:
        vae_sd = {**vae_sd, ema: torch.zeros(vae.quantize.ema_vocab_hit_SV.shape)}   # training statistics only
    _check_layout(vae, vae_sd, "vae_ckpt", vae_ckpt)
    _check_layout(var, var_sd, "var_ckpt", var_ckpt)
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    var.load_state_dict(var_sd, strict=True, assign=True)
    var.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return VARBackbone(vae, var).to(device)
