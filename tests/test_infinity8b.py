"""Infinity-8B's layout against the official ``Infinity.autoregressive_infer_cfg`` (FoundationVision/Infinity at
4c27bbb), offline: spatial patchify (a token is a 2 x 2 patch of the VAE's codes, 56 bits), the 14-bit VAE of patch 8,
and the sharded checkpoint (an index JSON and its shards).

The fixtures under tests/data/infinity8b (a tiny random Infinity built with ``apply_spatial_patchify=1``, as one .pth
and as a sharded folder, a tiny BSQ VAE of patch 8, the official bits and images) were made by
``tests/infinity_reference.py --layout 8b``; the T5 folder is the 2B fixtures'.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from infinity_reference import official_uint8
from safetensors.torch import save_file

from pipeline.backbones.base import BitwiseBackbone
from pipeline.backbones.infinity import (
    BSQDecoder,
    BSQDecoderConfig,
    Infinity,
    InfinityBackbone,
    InfinityConfig,
    T5Text,
    bits_of,
    bsq_config_from_state_dict,
    infinity_config_from_state_dict,
    load_bsq_decoder,
    load_infinity,
    load_infinity_model,
    official_guidance,
    square_schedule,
)
from pipeline.core.sampling import sample, sample_bits
from pipeline.data.files import load_state_dict

DATA = Path(__file__).parent / "data" / "infinity8b"
T5 = Path(__file__).parent / "data" / "infinity" / "text_encoder"
SHARDS, SINGLE = DATA / "infinity_shards", DATA / "infinity.pth"
INDEX = "pytorch_model.bin.index.json"
REF = torch.load(DATA / "reference.pt", weights_only=True)
K = len(REF["schedule"])
PATCH_NUMS = square_schedule("0.06M")


@pytest.fixture(scope="module")
def bb() -> InfinityBackbone:
    return load_infinity(SHARDS, DATA / "vae.pth", T5, patch_nums=PATCH_NUMS)


def test_the_layout_is_inferred_from_the_files(bb):
    cfg, vae = bb.model.cfg, bb.decoder.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.block_chunks, cfg.bits, cfg.text_maxlen) == (
        32, 2, 2, 2, 56, 128)
    assert (vae.bits, vae.ch, vae.ch_mult, vae.upsample_levels) == (14, 24, (1, 1, 1, 1), (1, 2, 3))   # patch 8
    assert bb.patch == 2 and isinstance(bb, BitwiseBackbone)
    assert bb.bits_per_token == 56 and bb.vocab_size == 2 ** 56
    assert [(t, h, w) for t, h, w in REF["schedule"]] == [(1, s, s) for s in PATCH_NUMS]


def test_the_8b_sizes_are_inferred():
    """Infinity-8B (model_type infinity_8b: depth 40 in 8 chunks, width 3584, 28 heads, mlp_ratio 4, 56 bits per token)
    and its VAE (vae_type 14: patch 8, ch_mult 1, 2, 4, 4), built on the meta device: the configuration read back from
    their state dicts in the released key layout is theirs."""
    cfg = InfinityConfig(embed_dim=3584, depth=40, num_heads=28, block_chunks=8, mlp_hidden=14336, bits=56)
    with torch.device("meta"):
        sd = Infinity(cfg).state_dict()
        vae_cfg = BSQDecoderConfig(bits=14, ch_mult=(1, 2, 4, 4), upsample_levels=(1, 2, 3))
        vae_sd = BSQDecoder(vae_cfg).state_dict()
    chunked = {(f"block_chunks.{int(k.split('.')[1]) // 5}.module.{int(k.split('.')[1]) % 5}."
                f"{k.split('.', 2)[2]}" if k.startswith("blocks.") else k): v for k, v in sd.items()}
    assert infinity_config_from_state_dict(chunked, cfg.patch_nums) == cfg
    assert bsq_config_from_state_dict(vae_sd) == vae_cfg


def run_case(bb: InfinityBackbone, i: int, text: T5Text) -> tuple[list[int], torch.Tensor]:
    """Case i of the fixtures through our sampler: the bits that differ from the official ones at each scale, and
    the image's largest difference (uint8)."""
    case = REF["cases"][i]
    bb = InfinityBackbone(bb.model, bb.decoder, text, tau=case["tau"],
                          negative_prompt=REF["negative"] if case["negative"] else None)
    w_cfg, ratios = official_guidance(case["cfg"], K)
    res = sample(bb, REF["prompts"][case["prompts"]], w_cfg=w_cfg, w_igg=None, schedule=ratios, top_k=case["top_k"],
                 top_p=case["top_p"], seed=case["seed"], with_signals=False, drop_uncond=True)
    assert res.images.shape[-2:] == (256, 256)          # 16 x 16 tokens of 2 x 2 codes, 8 px a code
    flipped = [int((bits_of(idx_Bl, 56).bool() != ref_Bld).sum())
               for idx_Bl, ref_Bld in zip(res.indices, REF["bits"][i], strict=True)]
    return flipped, (official_uint8(res.images).int() - REF["images"][i].int()).abs()


@pytest.mark.parametrize("i", range(len(REF["cases"])))
def test_same_bits_at_every_scale_and_same_image(bb, i):
    """With T5 padded to 512 as the official code (its text features to the bit; the logits are then within 1e-6
    at every scale)."""
    official_text = T5Text(bb.text.tokenizer, bb.text.encoder, 512, pad_to_max_length=True)
    flipped, diff = run_case(bb, i, official_text)
    assert flipped == [0] * K, f"case {i} {REF['cases'][i]}: bits that differ per scale {flipped}"
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01      # uint8 truncation at a boundary only


def test_padding_to_the_longest_prompt_moves_a_few_bits(bb):
    """Our default T5 padding (to the longest prompt) changes the text features by float32 rounding; at 56 bits per
    token that moves a bfloat16 rounding of the cross-attention from scale 3 on and, in the first case, 1 bit of
    58 352 at scale 4 (then 2 at the last scale; measured on a CPU in float32)."""
    flipped, _ = run_case(bb, 0, bb.text)
    assert sum(flipped) < 1e-3 * sum(b.numel() for b in REF["bits"][0])


def test_56_bits_pack_into_one_int64_index():
    ones_BlV = torch.tensor([0.0, 9.0]).repeat(56)[None, None]           # every bit's pair favours 1
    idx_Bl = sample_bits(torch.cat((ones_BlV, ones_BlV.flip(-1))), 56, top_k=1)
    assert idx_Bl.dtype == torch.int64 and idx_Bl.flatten().tolist() == [2 ** 56 - 1, 0]
    idx = torch.tensor([[2 ** 55, 2 ** 56 - 2, 12345678901234567]])
    assert bits_of(idx, 56)[0, :, 0].tolist() == [1, 1, 0] and bits_of(idx, 56)[0, 1, -1] == 0
    packed = (bits_of(idx, 56) << torch.arange(55, -1, -1)).sum(-1)
    assert torch.equal(packed, idx)


def test_the_shards_and_the_single_file_are_the_same_weights(tmp_path):
    single, sharded = load_state_dict(SINGLE, what="var_ckpt", fix=""), load_state_dict(SHARDS, what="var_ckpt", fix="")
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    index = json.loads((SHARDS / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 2 and index["weight_map"].keys() == single.keys()
    a, b = load_infinity_model(SINGLE, PATCH_NUMS), load_infinity_model(SHARDS, PATCH_NUMS)
    assert a.cfg == b.cfg and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                                     strict=True))
    # the same in safetensors shards (model.safetensors.index.json, preferred as transformers does)
    safe = tmp_path / "safe"
    shutil.copytree(SHARDS, safe)
    weight_map = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(single)}
    for name in set(weight_map.values()):
        save_file({k: single[k].contiguous() for k, n in weight_map.items() if n == name}, safe / name)
    (safe / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (safe / INDEX).write_text("not read")
    merged = load_state_dict(safe, what="var_ckpt", fix="")
    assert all(torch.equal(merged[k], single[k]) for k in single)


def sharded_copy(tmp_path: Path, index: dict | None = None) -> Path:
    folder = tmp_path / "shards"
    shutil.copytree(SHARDS, folder)
    if index is not None:
        (folder / INDEX).write_text(json.dumps(index))
    return folder


def one_line_error(path: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        load_infinity_model(path, PATCH_NUMS)
    assert "\n" not in str(err.value)


def test_broken_checkpoints_fail_with_one_clear_error(tmp_path):
    index = json.loads((SHARDS / INDEX).read_text())
    shard = "pytorch_model-00003-of-00003.bin"
    one_line_error(sharded_copy(tmp_path / "a", {**index, "weight_map": {**index["weight_map"], "pos_start": shard}}),
                   rf"names the shard .*{shard}, which is not there \(1 of 3 shards missing\)")
    one_line_error(sharded_copy(tmp_path / "b", {"weight_map": []}), rf"{INDEX}: not a shard index")
    (tmp_path / "c").mkdir()
    one_line_error(tmp_path / "c", r"a folder without a shard index \(model\.safetensors\.index\.json or "
                                   r"pytorch_model\.bin\.index\.json\)")
    folder = sharded_copy(tmp_path / "d")
    part = torch.load(folder / "pytorch_model-00002-of-00002.bin", weights_only=True)
    key = next(iter(part))
    torch.save({k: v for k, v in part.items() if k != key}, folder / "pytorch_model-00002-of-00002.bin")
    one_line_error(folder, rf"pytorch_model-00002-of-00002\.bin: not the keys {INDEX} gives it \(lacks \['{key}'\]")

    sd = torch.load(SINGLE, weights_only=True)
    lacking = tmp_path / "lacking.pth"
    torch.save({k: v for k, v in sd.items() if k != "block_chunks.1.module.0.ffn.fc2.bias"}, lacking)
    one_line_error(lacking, r"lacking\.pth: not the layout inferred from it \(missing 1: "
                            r"blocks\.1\.ffn\.fc2\.bias\)$")
    torch.save({k: v for k, v in sd.items() if k != "word_embed.weight"}, lacking)
    one_line_error(lacking, r"not an Infinity state dict \(no word_embed\.weight\)")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, lacking)
    one_line_error(lacking, r"\(unexpected 1: extra\.weight\)$")


def test_a_vae_of_other_bits_is_refused(bb):
    vae_2b = load_bsq_decoder(Path(__file__).parent / "data" / "infinity" / "vae.pth")     # 16 bits
    with pytest.raises(ValueError, match=r"the transformer's tokens hold 56 bits, the VAE's codes 16: a token is one "
                                         r"code \(d bits\) or a 2 x 2 patch of them"):
        InfinityBackbone(bb.model, vae_2b, bb.text)


def test_backbone_infinity_8b_composes_and_loads_the_shards(tmp_path):
    import numpy as np
    from sweep_fixtures import write_prompts

    from pipeline.backbones.load import load_backbone
    from pipeline.config.schema import ConfigError, load_config

    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    prompts = write_prompts(tmp_path / "prompts.csv", ["a red cube", "a dog"])
    overrides = ["backbone=infinity_8b", f"backbone.var_ckpt={SHARDS}", f"backbone.vae_ckpt={DATA / 'vae.pth'}",
                 f"backbone.text_encoder={T5}", f"backbone.prompts={prompts}",
                 f"backbone.patch_nums=[{','.join(map(str, PATCH_NUMS))}]", f"root={tmp_path / 'runs'}",
                 f"backbone.fid_reference={tmp_path / 'stats.npz'}", "guidance.schedule=constant"]
    b = load_config(overrides).backbone
    assert (b.name, b.kind, b.tau, b.default_cfg, b.top_k, b.top_p) == ("infinity_8b", "infinity", [1.0], 2.0, 900,
                                                                         0.97)
    loaded = load_backbone(b)
    assert loaded.patch == 2 and loaded.bits_per_token == 56
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"backbone\.var_ckpt: .*empty is a folder without a shard index") as err:
        load_config([*overrides, f"backbone.var_ckpt={tmp_path / 'empty'}"])
    assert "\n" not in str(err.value)
