"""Make the Switti parity fixtures of tests/test_switti.py from the official code (run once; its output is committed).

    python tests/switti_reference.py --official /path/to/yandex-research/switti [--out tests/data/switti] [--add]

With ``--add`` the folders and the recorded cases under ``--out`` are kept as they are and only the cases of CASES
that reference.pt lacks are recorded and appended (the models are rebuilt from their seeds and checked against the
saved weights); without it everything is rebuilt and rewritten.

Needs, besides guidetune's own packages, what the official code imports (diffusers, einops, typed-argument-parser,
pytz) and a checkout of https://github.com/yandex-research/switti whose folder is the working directory's git
repository or inside one (its utils/arg_util.py asks git for a branch name at import).

It builds, offline and seeded:
- two tiny random CLIP text towers (``transformers.CLIPTextModel`` from small ``CLIPTextConfig``s) with a tiny
  byte-level BPE tokenizer, in the Hub layout (CLIP-L stand-in of width 32, bigG stand-in of width 48);
- the official ``Switti`` (depth 2, width 32, 2 heads, vocabulary 64, 5 scales), once non-AR and once AR, with random
  weights whose logits are spread out. The official class hard-codes the text widths of the real encoders
  (768 + 1280 context, 1280 pooled); the script swaps ``text_pooler``, every ``cross_attn.to_kv`` and every
  ``attention_y_norm`` for layers of the tiny widths after construction, which leaves the forward code untouched;
- the official ``VQVAE`` (vocabulary 64, Cvae 8) with its encoder and decoder replaced by the official classes at a
  small size (ch 32, ch_mult (1,), one res-block), so the folder stays small;

then saves them in the Hub layout (config.json + model.safetensors) and records, for each case of CASES, the
official ``SwittiPipeline``'s tokens of every scale and its images. The tokens are captured by wrapping the
pipeline's ``sample_with_top_k_top_p_`` (the values it returns are not changed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

PATCH_NUMS = (1, 2, 3, 4, 6)
VOCAB, CVAE, DEPTH, WIDTH, HEADS = 64, 8, 2, 32, 2
TEXT_WIDTHS = {"text_encoder": 32, "text_encoder_2": 48}    # stand-ins for CLIP-L (768) and bigG (1280)
PROMPTS = [
    ["a red cube on a table", "the blue sphere", ""],
    ["two cats and a dog in the snow at night, photorealistic, " * 6, "a dog", "green"],   # the first is truncated
]
K = len(PATCH_NUMS)
# model, prompts, cfg, on, off, last_scale_temp, top_k, top_p, seed
CASES = [
    ("switti", 0, 6.0, 0, K, None, 1, 0.0, 0),
    ("switti", 1, 2.0, 0, K, None, 1, 0.0, 0),
    ("switti", 0, 4.0, 1, 3, None, 1, 0.0, 0),
    ("switti", 1, 6.0, 0, 3, 0.5, 1, 0.0, 0),
    ("switti", 0, 6.0, 0, K, None, 8, 0.9, 1),
    ("switti", 1, 3.0, 1, 4, 0.7, 16, 0.95, 2),
    ("switti", 0, 6.0, 2, K, None, 0, 0.0, 3),
    ("switti", 1, 0.0, 0, K, None, 0, 0.8, 4),
    ("switti", 0, 6.0, 0, 0, 0.5, 8, 0.0, 5),
    ("switti_ar", 0, 6.0, 0, K, None, 1, 0.0, 0),
    ("switti_ar", 1, 2.0, 0, 3, None, 1, 0.0, 0),
    ("switti_ar", 0, 4.0, 1, 4, 0.5, 1, 0.0, 0),
    ("switti_ar", 1, 6.0, 0, K, None, 8, 0.9, 6),
    ("switti_ar", 0, 3.0, 1, 3, 0.7, 16, 0.95, 7),
    ("switti_ar", 1, 6.0, 0, 2, None, 0, 0.0, 8),
    # empty interval (on == off > 0): the official pipeline divides by the temperature from the off scale on only
    ("switti", 0, 6.0, 3, 3, 0.5, 8, 0.0, 9),
    ("switti_ar", 1, 3.0, 2, 2, 0.7, 16, 0.95, 10),
    # reversed interval (on > off): no scale guided, the uncond half dropped from off, the temperature from on
    ("switti", 1, 6.0, 4, 2, None, 8, 0.9, 11),
    ("switti", 0, 6.0, 4, 2, 0.5, 8, 0.0, 12),
    ("switti_ar", 0, 4.0, 3, 1, 0.5, 16, 0.95, 13),
]
CASE_KEYS = ("model", "prompts", "cfg", "turn_on", "turn_off", "last_scale_temp", "top_k", "top_p", "seed")


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins of the 256 bytes (the base alphabet of CLIP's byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer_files(folder: Path, pad_token: str) -> None:
    """A byte-level BPE vocabulary (256 bytes, their word-final forms, a few merges) in CLIP's format."""
    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>"), ("i", "n"), ("e", "r"),
              ("r", "e"), ("c", "u"), ("cu", "be</w>"), ("b", "e</w>"), ("d", "o"), ("do", "g</w>")]
    vocab += ["".join(m) for m in merges if "".join(m) not in vocab] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token}))


def tiny_text_encoder(folder: Path, width: int, pad_token: str, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tiny_tokenizer_files(folder, pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            projection_dim=width, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def spread_out(model: nn.Module, seed: int, keep: tuple[str, ...] = ()) -> None:
    """Random weights whose outputs are spread: matrices ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.1²),
    other vectors ~ N(0, 0.02²) (crop scales ~ N(0, 0.5²))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(k) for k in keep):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("y_norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("crop_cond_scales"):
                p.copy_(0.5 * noise)
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.02 * noise)


def official_switti(use_ar: bool, seed: int, *, depth: int = DEPTH, width: int = WIDTH, heads: int = HEADS,
                    vocab: int = VOCAB, cvae: int = CVAE, patch_nums: tuple[int, ...] = PATCH_NUMS):
    from models.basic_switti import RMSNorm
    from models.switti import Switti

    torch.manual_seed(seed)
    model = Switti(Cvae=cvae, V=vocab, depth=depth, embed_dim=width, num_heads=heads, patch_nums=patch_nums,
                   use_ar=use_ar, use_crop_cond=True, use_swiglu_ffn=True, rope=True)
    pooled, context = TEXT_WIDTHS["text_encoder_2"], sum(TEXT_WIDTHS.values())
    model.pooled_embed_size, model.context_dim = pooled, context
    model.text_pooler = nn.Linear(pooled, model.D)
    for block in model.blocks:
        block.cross_attn.to_kv = nn.Linear(context, 2 * width)
        block.attention_y_norm = RMSNorm(context, eps=1e-6)
    spread_out(model, seed, keep=("crop_embed",))
    return model.eval()


def official_vae(seed: int, *, vocab: int = VOCAB, cvae: int = CVAE, patch_nums: tuple[int, ...] = PATCH_NUMS):
    from models.basic_vae import Decoder, Encoder
    from models.vqvae import VQVAE

    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=vocab, z_channels=cvae, ch=32, v_patch_nums=patch_nums, test_mode=True)
    small = dict(ch=32, ch_mult=(1,), num_res_blocks=1, dropout=0.0, z_channels=cvae, using_sa=True,
                 using_mid_sa=True)
    vae.encoder, vae.decoder = Encoder(double_z=False, **small), Decoder(**small)
    with torch.no_grad():
        vae.quantize.embedding.weight.normal_()
    return vae.eval().requires_grad_(False)


def released_layouts() -> dict[str, dict[str, list[int]]]:
    """Key -> shape of the released classes at full size (built on the meta device, nothing downloaded)."""
    from models.switti import SwittiHF
    from models.vqvae import VQVAEHF

    layouts = {}
    with torch.device("meta"):
        for depth, reso in ((24, 512), (30, 1024)):
            for use_ar in (False, True):
                model = SwittiHF(depth=depth, reso=reso, use_ar=use_ar)
                layouts[f"switti_d{depth}_{reso}{'_ar' if use_ar else ''}"] = {
                    k: list(v.shape) for k, v in model.state_dict().items()}
        layouts["vqvae_1024"] = {k: list(v.shape) for k, v in VQVAEHF(reso=1024).state_dict().items()}
    return layouts


def save_hub(folder: Path, model: nn.Module, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def check_saved(folder: Path, model: nn.Module) -> None:
    """Exit unless ``model``'s weights equal those saved in ``folder`` (``--add`` records on the saved weights)."""
    from safetensors.torch import load_file

    saved, state = load_file(folder / "model.safetensors"), model.state_dict()
    if saved.keys() != state.keys() or not all(torch.equal(saved[k], state[k]) for k in saved):
        raise SystemExit(f"{folder}: not the weights this script builds; rerun without --add to rebuild everything")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="checkout of yandex-research/switti")
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "switti"))
    parser.add_argument("--add", action="store_true",
                        help="keep --out's folders and recorded cases; record only the cases it lacks")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    sys.path.insert(0, str(Path(args.official).resolve()))
    os.chdir(args.official)
    torch.use_deterministic_algorithms(True)

    import models.pipeline as official_pipeline
    from models.clip import FrozenCLIPEmbedder
    from models.pipeline import SwittiPipeline

    old = torch.load(out / "reference.pt", weights_only=True) if args.add else None
    if old is not None and (old["prompts"] != PROMPTS or old["patch_nums"] != list(PATCH_NUMS)):
        raise SystemExit(f"{out}: recorded with other prompts or scales; rerun without --add to rebuild everything")
    if old is None:
        for i, (role, width) in enumerate(TEXT_WIDTHS.items()):
            tiny_text_encoder(out / role, width, pad_token="<|endoftext|>" if i == 0 else "!", seed=10 + i)
    vae = official_vae(seed=1)
    models = {name: official_switti(use_ar, seed=2 + use_ar) for name, use_ar in (("switti", False),
                                                                                  ("switti_ar", True))}
    for name, model in (("vae", vae), *models.items()):
        if old is not None:
            check_saved(out / name, model)
        elif name == "vae":
            save_hub(out / name, model, {"vocab_size": VOCAB, "z_channels": CVAE, "ch": 32, "share_quant_resi": 4})
        else:
            save_hub(out / name, model, {"depth": DEPTH, "num_heads": HEADS, "rope": True, "rope_theta": 10000,
                                         "rope_size": 128, "use_swiglu_ffn": True, "use_ar": name == "switti_ar",
                                         "use_crop_cond": True})

    encoders = [FrozenCLIPEmbedder(str(out / role), device="cpu") for role in TEXT_WIDTHS]
    drawn: list[torch.Tensor] = []
    original = official_pipeline.sample_with_top_k_top_p_

    def recording(*a, **kw):
        idx = original(*a, **kw)
        drawn.append(idx[:, :, 0].clone())
        return idx

    official_pipeline.sample_with_top_k_top_p_ = recording
    cases, tokens, images = ([], [], []) if old is None else (old["cases"], old["tokens"], old["images"])
    for case in CASES:
        settings = dict(zip(CASE_KEYS, case, strict=True))
        if settings in cases:
            continue
        pipe = SwittiPipeline(models[settings["model"]], vae, *encoders, device="cpu")
        drawn.clear()
        img = pipe(PROMPTS[settings["prompts"]], cfg=settings["cfg"], top_k=settings["top_k"],
                   top_p=settings["top_p"], seed=settings["seed"], return_pil=False,
                   turn_on_cfg_start_si=settings["turn_on"], turn_off_cfg_start_si=settings["turn_off"],
                   last_scale_temp=settings["last_scale_temp"])
        assert len(drawn) == K
        cases.append(settings)
        tokens.append([t.clone() for t in drawn])
        images.append(img.float().clone())
        print(settings["model"], case[1:], [t[0, :4].tolist() for t in drawn[-2:]], flush=True)
    if old is None:
        pipe = SwittiPipeline(models["switti"], vae, *encoders, device="cpu")
        context, pooled, bias = pipe.encode_prompt(PROMPTS[1])
        encoding = {"prompts": PROMPTS[1], "context": context, "pooled": pooled, "bias": bias}
        layouts = released_layouts()
    else:
        encoding, layouts = old["encoding"], old["layouts"]
    torch.save({"patch_nums": list(PATCH_NUMS), "prompts": PROMPTS, "cases": cases, "tokens": tokens,
                "images": images, "encoding": encoding, "layouts": layouts},
               out / "reference.pt")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
