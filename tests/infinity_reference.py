"""Make the Infinity parity fixtures of tests/test_infinity.py from the official code (run once; output committed).

    python tests/infinity_reference.py --official /path/to/FoundationVision/Infinity [--deps DIR] [--out DIR]
    python tests/infinity_reference.py --layout 8b --official /path/to/FoundationVision/Infinity [--deps DIR]

The first writes tests/data/infinity/ (the 2B layout, below), the second tests/data/infinity8b/ (the 8B layout, see
"The 8B layout"; it reuses the first's T5 folder, ``--text-encoder``).

The official code is https://github.com/FoundationVision/Infinity at commit 4c27bbb (the parity was recorded
there; ``git archive 4c27bbb infinity tools/run_infinity.py`` is all it needs). Besides guidetune's packages it
imports ``timm``, ``einops``, ``pytz`` and ``imageio``: ``--deps`` is a folder put first on ``sys.path`` holding them
(``pip install --no-deps --target DIR einops timm pytz imageio``), so guidetune's own environment stays untouched.

It builds, offline and seeded, at the real 256 px schedule of Infinity (aspect 1.0, ``0.06M``: 7 scales, side
1 .. 16, 521 tokens):
- a tiny random T5 encoder (``transformers.T5EncoderModel``, width 128, one layer, gated GELU as flan-t5) with a
  tiny Unigram tokenizer, saved as a local folder: the stand-in for ``google/flan-t5-xl`` (width 2048);
- the official BSQ VAE (``infinity.models.bsq_vae.vae.vae_model``, 16 bits, patch 4, base width 24, one res-block
  per level), so that 16 x 16 tokens decode to 64 x 64 pixels;
- the official ``Infinity`` (depth 2 in 2 block chunks, width 64, 2 heads, text width 128, text_maxlen 512) with the
  constructor arguments of ``tools/run_infinity.py``'s ``load_infinity`` (shared AdaLN, fused norm, rope2d on every
  self-attention normalised by h·w (2), bit labels, inference mode), random weights spread out so that the bit
  logits are far from 0;

then saves the weights as ``infinity.pth`` (Infinity's state dict, as the released ``infinity_2b_reg.pth``),
``vae.pth`` (``{"vae": state dict}``, the layout ``vae_model`` reads) and the T5 folder ``text_encoder/``, and records
for each case of CASES ``autoregressive_infer_cfg``'s bits at every scale and its uint8 image, plus, for the first
case, the logits of every scale (after guidance and temperature). Prompts are encoded with the official
``tools/run_infinity.encode_prompt`` (one prompt at a time, then concatenated into one batch).

Patches, each needed to run the official code on a CPU without its GPU-only packages (none changes a number):
- ``flash_attn``: not installable without CUDA. ``infinity/models/basic.py`` imports ``flash_attn_func`` and
  ``flash_attn_varlen_kvpacked_func`` unconditionally. A module ``flash_attn`` is put in ``sys.modules`` with the
  plain-PyTorch stand-ins below (:func:`flash_attn_func`, :func:`flash_attn_varlen_kvpacked_func`), tested against
  dense attention in tests/test_infinity.py. Self-attention never calls them (the customised kernel is absent, so it
  takes PyTorch's SDPA); cross-attention and the text pooling always call the varlen one, after casting fp32 q and
  kv to bfloat16: the stand-in computes in float32 from those bfloat16 values and returns bfloat16, as the kernel
  does (the kernel's own rounding of the softmax weights to bfloat16 before P·V is not reproduced).
- ``torch.compile``: ``infinity/models/fused_op.py`` compiles its fused norms with ``fullgraph=True``; on a CPU that
  needs Inductor and a C++ toolchain and changes rounding. While the official modules are imported, ``torch.compile``
  returns the function unchanged (eager: the same math).
- ``cv2``: imported by ``tools/run_infinity.py`` (for writing files only); a stub module stands in.
- ``Tensor.cuda``: ``encode_prompt`` moves the token ids to the GPU; during that call ``.cuda()`` returns the tensor.
- ``bsq_vae/vae.py``'s ``vae_model`` hard-codes the width (``base_ch=128``, two res-blocks per level): while it runs,
  its ``AutoEncoder`` is given the same arguments with ``base_ch=24`` and ``num_res_blocks=1``. Its
  ``device='cuda'`` argument is never read, so it needs no patch.
Everything runs in float32 (the official CLI casts the blocks to bfloat16 and runs under CUDA autocast; the parity
is of the float32 path, where only the cross-attention rounds to bfloat16).

The 8B layout (``--layout 8b``, tests/test_infinity8b.py): Infinity-8B's ``apply_spatial_patchify=1``, where a
token of the transformer is a 2 x 2 patch of the VAE's d-bit codes (4·d bits), with the 8B's 14-bit VAE of patch 8
(``vae_type=14``; four decoder levels, three upsamplings, as ``load_visual_tokenizer`` builds it for the patchify
layout, here at base width 24 with ``decoder_ch_mult=[1, 1, 1, 1]`` instead of ``[1, 2, 4, 4]``, and
``encoder_ch_mult=[1]``) and the transformer (depth 2, width 32, 2 heads, text_maxlen 128: the prompts are short;
512 in the release) built with ``apply_spatial_patchify=1`` and ``add_lvl_embeding_only_first_block=1`` (the 8B
scripts'). At ``0.06M`` the transformer's sides are 1 .. 16, the VAE's 2 .. 32: 56 bits per token, 256 x 256
images. Its state dict is saved twice: ``infinity.pth`` and the sharded folder ``infinity_shards/``
(``pytorch_model.bin.index.json`` mapping each key to one of two ``torch.save`` shards, the layout of transformers'
sharded checkpoints, which ``load_sharded_checkpoint`` reads for the official ``checkpoint_type='torch_shard'``;
checked here with it, strict). Only bits and images are recorded (no logits), for CASES_8B (2.2 MB in all).

Findings recorded by the cases: ``sampling_per_bits`` is accepted and never read at 4c27bbb (the case with 4 draws
the same bits as the one with 1); ``top_k`` is applied to each bit's pair of logits, so any ``top_k >= 2`` (the
CLI's 900) is a no-op and ``top_k=1`` is greedy; at a scale whose cfg is 1 the logits are the conditional ones,
even while the batch holds both halves.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import math
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

COMMIT = "4c27bbb"
H_DIV_W, PN = 1.0, "0.06M"
TEXT_WIDTH = 128
DEPTH, CHUNKS, HEADS, VAE_WIDTH = 2, 2, 2, 24
DATA = Path(__file__).parent / "data"
PROMPTS = [
    ["a red cat on the table", "the blue dog in the snow"],
    ["", "a dog and a cat, " * 120],            # empty; longer than 512 tokens (truncated)
    ["a blue dog in the snow"],                # one image (the 8B layout: 256 px images, small fixtures)
]
NEGATIVE = "blurry, ugly, low quality"         # one negative prompt for every image, as the CLI
K = 7
# model variant, prompts, negative, cfg (float or per-scale list), tau (float or list), top_k, top_p, seed,
# sampling_per_bits
CASES = [
    ("first", 0, False, 3.0, 1.0, 900, 0.97, 0, 1),         # the CLI's defaults
    ("first", 0, False, [1.0, 2.0, 3.0, 1.0, 4.0, 4.0, 5.0], 1.0, 900, 0.97, 1, 1),
    ("first", 1, False, 4.0, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], 900, 0.97, 2, 1),
    ("first", 0, False, 4.0, 0.5, 0, 0.9, 3, 1),
    ("first", 1, False, 2.0, 1.0, 0, 0.0, 4, 1),
    ("first", 0, False, 3.0, 1.0, 1, 0.0, 5, 1),              # greedy: top_k=1 over each bit's pair
    ("first", 0, False, 3.0, 1.0, 900, 0.97, 0, 4),         # sampling_per_bits=4: the same bits as case 0
    ("first", 0, True, 3.0, 1.0, 900, 0.97, 6, 1),          # negative prompt
    ("first", 1, False, 1.0, 1.0, 900, 0.97, 7, 1),         # cfg 1: no guidance, no unconditional half
    ("every", 0, False, 3.0, 0.7, 900, 0.97, 8, 1),         # lvl_embed added before every block chunk
    ("every", 1, True, [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0], 1.0, 900, 0.95, 9, 1),
]
CASES_8B = [
    ("first", 0, False, 3.0, 1.0, 900, 0.97, 0, 1),         # the CLI's defaults (the 8B scripts': cfg 3, tau 1)
    ("first", 2, True, [1.0, 2.0, 3.0, 1.0, 4.0, 4.0, 5.0], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], 900, 0.9, 1, 1),
    ("first", 2, False, 3.0, 1.0, 1, 0.0, 5, 1),              # greedy
]
CASE_KEYS = ("lvl_embed", "prompts", "negative", "cfg", "tau", "top_k", "top_p", "seed", "sampling_per_bits")


@dataclass(frozen=True)
class Layout:
    """One tiny model family: the VAE's bits, patch and decoder levels, the transformer's width, the cases."""

    bits: int                          # d: the VAE's bits per code
    patchify: bool                     # apply_spatial_patchify: a token is a 2 x 2 patch of codes (4·d bits)
    vae_patch: int
    decoder_ch_mult: tuple[int, ...]
    width: int
    text_maxlen: int                   # rows of cfg_uncond (the released models: 512)
    variants: tuple[str, ...]          # "first": lvl_embed before the first block only; "every": before every chunk
    cases: list
    record_logits: bool                # the first case's logits and float image (and the text encodings)
    out: Path

    @property
    def token_bits(self) -> int:
        return 4 * self.bits if self.patchify else self.bits


LAYOUTS = {
    "2b": Layout(16, False, 4, (1, 1, 1), 64, 512, ("first", "every"), CASES, True, DATA / "infinity"),
    "8b": Layout(14, True, 8, (1, 1, 1, 1), 32, 128, ("first",), CASES_8B, False, DATA / "infinity8b"),
}


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    """flash-attn's varlen attention with packed kv, in plain PyTorch: sequence i's queries
    ``q[cu_q[i]:cu_q[i+1]]`` (Nq, H, c) attend to its keys and values ``kv[cu_k[i]:cu_k[i+1]]`` (Nk, 2, H, c).
    Computed in float32 from the given values; returns (Nq, H, c) in q's dtype. Not causal, no dropout."""
    if dropout_p or causal or unused:
        raise NotImplementedError("stand-in: no dropout, causal masks or extra options")
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        q_1Hlc = q[qs:qe].float().transpose(0, 1).unsqueeze(0)
        k_1HTc, v_1HTc = (kv[ks:ke, j].float().transpose(0, 1).unsqueeze(0) for j in (0, 1))
        out[qs:qe] = F.scaled_dot_product_attention(q_1Hlc, k_1HTc, v_1HTc, scale=softmax_scale)[0].transpose(0, 1)
    return out.to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    """flash-attn's dense attention (B, L, H, c) in plain PyTorch, float32 inside, q's dtype out."""
    if dropout_p or causal or unused:
        raise NotImplementedError("stand-in: no dropout, causal masks or extra options")
    q_BHLc, k_BHLc, v_BHLc = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, scale=softmax_scale).transpose(1, 2).to(q.dtype)


@contextmanager
def eager_compile():
    """``torch.compile`` returns the function unchanged (also as a decorator factory)."""
    original = torch.compile

    def identity(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    torch.compile = identity
    try:
        yield
    finally:
        torch.compile = original


@contextmanager
def cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **kw: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def install_stubs() -> None:
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = flash_attn_func
    flash.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    sys.modules["flash_attn"] = flash
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    # the stub is not a real package: transformers' availability checks (find_spec) must not trip on it
    flash.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)


def tiny_t5(folder: Path, seed: int) -> None:
    """A Unigram tokenizer of ~80 pieces (words, '▁', characters) and a one-layer T5 encoder of width 128."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", -20.0)]
    pieces += [(w, -2.0) for w in ("▁a", "▁the", "▁red", "▁cat", "▁dog", "▁on", "▁in", "▁and", "▁blue", "▁snow")]
    pieces += [("▁", -3.0)] + [(c, -4.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(pieces), d_model=TEXT_WIDTH, d_kv=32, d_ff=128, num_layers=1, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def spread_out(model: nn.Module, seed: int) -> None:
    """Random weights with spread outputs: matrices ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.1²), other vectors
    ~ N(0, 0.1²), attention logit scales log(4) + N(0, 0.1²), the unconditional text embedding ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("scale_mul_1H11"):
                p.copy_(math.log(4.0) + 0.1 * noise)
            elif name == "cfg_uncond":
                p.copy_(noise)
            elif "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.1 * noise)


def official_vae(layout: Layout, seed: int):
    import infinity.models.bsq_vae.vae as vae_module

    official_autoencoder = vae_module.AutoEncoder
    vae_module.AutoEncoder = lambda args: official_autoencoder(
        argparse.Namespace(**{**vars(args), "base_ch": VAE_WIDTH, "num_res_blocks": 1}))
    try:
        torch.manual_seed(seed)
        vae = vae_module.vae_model({}, "dynamic", layout.bits, 2 ** layout.bits, test_mode=True,
                                   patch_size=layout.vae_patch, encoder_ch_mult=[1],
                                   decoder_ch_mult=list(layout.decoder_ch_mult))
    finally:
        vae_module.AutoEncoder = official_autoencoder
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


def official_infinity(layout: Layout, vae, seed: int, lvl_embed_first_block_only: bool):
    from infinity.models.infinity import Infinity

    torch.manual_seed(seed)
    model = Infinity(
        vae_local=vae, text_channels=TEXT_WIDTH, text_maxlen=layout.text_maxlen, shared_aln=True,
        raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False, fused_norm=True,
        pad_to_multiplier=128, use_flex_attn=False, use_bit_label=1, rope2d_each_sa_layer=1,
        add_lvl_embeding_only_first_block=int(lvl_embed_first_block_only), rope2d_normalized_by_hw=2, pn=PN,
        apply_spatial_patchify=int(layout.patchify), inference_mode=True, train_h_div_w_list=[1.0], depth=DEPTH,
        embed_dim=layout.width, num_heads=HEADS, drop_path_rate=0.1, mlp_ratio=4, block_chunks=CHUNKS)
    spread_out(model, seed)
    return model.eval().requires_grad_(False)


def official_uint8(images_B3HW: torch.Tensor) -> torch.Tensor:
    """What ``autoregressive_infer_cfg`` returns for an image batch in [0, 1]: (B, H, W, 3) uint8, BGR."""
    return images_B3HW.permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,))


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """A sharded checkpoint as transformers writes one: ``pytorch_model-0000i-of-0000n.bin`` (``torch.save`` of a
    part of the state dict, keys in order) and ``pytorch_model.bin.index.json`` (``metadata.total_size`` in bytes,
    ``weight_map``: key -> shard file name)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def encode_batch(tokenizer, encoder, prompts: list[str]):
    """The official ``encode_prompt`` of each prompt, concatenated into one batch (kv_compact, lens, cu, max)."""
    from tools.run_infinity import encode_prompt

    with cuda_is_identity():
        parts = [encode_prompt(tokenizer, encoder, p) for p in prompts]
    lens = [le for part in parts for le in part[1]]
    cu = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return torch.cat([part[0] for part in parts]), lens, cu, max(lens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help=f"checkout of FoundationVision/Infinity at {COMMIT}")
    parser.add_argument("--deps", help="folder with timm, einops, pytz, imageio (put first on sys.path)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="2b",
                        help="2b: 16 bits per token; 8b: apply_spatial_patchify, a 14-bit VAE of patch 8, shards")
    parser.add_argument("--out", help="output folder (default: tests/data/infinity or tests/data/infinity8b)")
    parser.add_argument("--text-encoder", default=str(DATA / "infinity" / "text_encoder"),
                        help="--layout 8b: the T5 folder the 2b layout wrote")
    args = parser.parse_args(argv)
    layout = LAYOUTS[args.layout]
    out = Path(args.out or layout.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(Path(args.official).resolve())] + ([str(Path(args.deps).resolve())] if args.deps else [])
    torch.use_deterministic_algorithms(True)
    from transformers import AutoTokenizer, T5EncoderModel
    from transformers.trainer_utils import load_sharded_checkpoint

    T5EncoderModel.__init__  # noqa: B018  (loads transformers' T5 modules before the flash_attn stub exists)
    install_stubs()
    with eager_compile():
        import infinity.models.infinity as official
        from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    schedule = [(1, h, w) for _, h, w in dynamic_resolution_h_w[H_DIV_W][PN]["scales"]]
    assert len(schedule) == K
    text_folder = Path(args.text_encoder)
    if not layout.patchify:
        text_folder = out / "text_encoder"
        tiny_t5(text_folder, seed=10)
    tokenizer = AutoTokenizer.from_pretrained(text_folder, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(text_folder, local_files_only=True).eval()
    vae = official_vae(layout, seed=1)
    models = {v: official_infinity(layout, vae, seed=2, lvl_embed_first_block_only=v == "first")
              for v in layout.variants}
    for model in models.values():
        model.load_state_dict(models["first"].state_dict(), strict=True)
    torch.save(models["first"].state_dict(), out / "infinity.pth")
    torch.save({"vae": vae.state_dict()}, out / "vae.pth")
    if layout.patchify:      # the official checkpoint_type='torch_shard' reads the folder with transformers' loader
        save_sharded(models["first"].state_dict(), out / "infinity_shards")
        check = official_infinity(layout, vae, seed=3, lvl_embed_first_block_only=True)
        load_sharded_checkpoint(check, out / "infinity_shards", strict=True)
        assert all(torch.equal(a, b) for a, b in zip(check.state_dict().values(),
                                                      models["first"].state_dict().values(), strict=True))

    drawn: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    decoded: list[torch.Tensor] = []
    sampler = official.sample_with_top_k_top_p_also_inplace_modifying_logits_

    def recording_sampler(logits_BlV, **kw):
        logits.append(logits_BlV.clone())
        idx = sampler(logits_BlV, **kw)
        drawn.append(idx[:, :, 0].clone())
        return idx

    official.sample_with_top_k_top_p_also_inplace_modifying_logits_ = recording_sampler
    vae_decode = vae.decode
    vae.decode = lambda z: decoded.append(vae_decode(z)) or decoded[-1]

    d = layout.token_bits
    cases, bits, images, record = [], [], [], {}
    with torch.no_grad():
        for case in layout.cases:
            s = dict(zip(CASE_KEYS, case, strict=True))
            prompts = PROMPTS[s["prompts"]]
            cond = encode_batch(tokenizer, encoder, prompts)
            negative = encode_batch(tokenizer, encoder, [NEGATIVE] * len(prompts)) if s["negative"] else None
            cfg_list = s["cfg"] if isinstance(s["cfg"], list) else [s["cfg"]] * K
            tau_list = s["tau"] if isinstance(s["tau"], list) else [s["tau"]] * K
            drawn.clear(), logits.clear(), decoded.clear()
            _, _, img = models[s["lvl_embed"]].autoregressive_infer_cfg(
                vae=vae, scale_schedule=schedule, label_B_or_BLT=cond, B=len(prompts),
                negative_label_B_or_BLT=negative, g_seed=s["seed"], cfg_list=cfg_list, tau_list=tau_list,
                top_k=s["top_k"], top_p=s["top_p"], returns_vemb=1, cfg_insertion_layer=[0], vae_type=layout.bits,
                ret_img=True, gt_leak=0, inference_mode=True, sampling_per_bits=s["sampling_per_bits"])
            assert len(drawn) == K and len(decoded) == 1
            cases.append(s)
            bits.append([b.reshape(len(prompts), -1, d).bool() for b in drawn])
            images.append(img.clone())
            if layout.record_logits and not record:
                record = {"logits": [lg.reshape(len(prompts), -1, 2 * d).clone() for lg in logits],
                          "image": decoded[0].clone()}
            ones = [b.float().mean().item() for b in bits[-1]]
            print(s["lvl_embed"], case[1:], "share of 1 bits per scale:", [f"{o:.2f}" for o in ones], flush=True)
    for i, s in enumerate(cases):      # sampling_per_bits is never read: the same bits as with 1
        twin = {**s, "sampling_per_bits": 1}
        if s["sampling_per_bits"] != 1 and twin in cases:
            assert all(torch.equal(a, b) for a, b in zip(bits[i], bits[cases.index(twin)], strict=True))
    if layout.record_logits:
        encoding = encode_batch(tokenizer, encoder, PROMPTS[0])
        record |= {"encoding": {"kv_compact": encoding[0], "lens": encoding[1]},
                   "long_lens": encode_batch(tokenizer, encoder, PROMPTS[1])[1]}
    torch.save({"commit": COMMIT, "schedule": schedule, "prompts": PROMPTS, "negative": NEGATIVE, "cases": cases,
                "bits": bits, "images": images, **record}, out / "reference.pt")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
