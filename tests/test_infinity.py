"""Parity of guidetune's Infinity with the official ``Infinity.autoregressive_infer_cfg`` (FoundationVision/Infinity
at 4c27bbb), offline.

The fixtures under tests/data/infinity (a tiny random Infinity, BSQ VAE and T5 encoder, and the official code's
bits, images and first-case logits) were made by tests/infinity_reference.py, which also holds the flash-attn
stand-ins tested here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from infinity_reference import flash_attn_func, flash_attn_varlen_kvpacked_func, official_uint8

from pipeline.backbones.base import BitwiseBackbone
from pipeline.backbones.infinity import (
    InfinityBackbone,
    bits_of,
    infinity_args,
    load_bsq_decoder,
    load_infinity,
    load_infinity_model,
    load_t5,
    official_guidance,
    square_schedule,
)
from pipeline.core.metrics import bit_pairs, divergence, vocab_evenness
from pipeline.core.sampling import Sampling, sample, sample_bits

DATA = Path(__file__).parent / "data" / "infinity"
REF = torch.load(DATA / "reference.pt", weights_only=True)
K = len(REF["schedule"])
PATCH_NUMS = square_schedule("0.06M")


@pytest.fixture(scope="module")
def parts():
    """Both transformer variants (level embedding before the first block only / before every chunk), the
    decoder and T5, loaded once."""
    models = {variant: load_infinity_model(DATA / "infinity.pth", PATCH_NUMS, lvl_embed_every_chunk=variant == "every")
              for variant in ("first", "every")}
    return models, load_bsq_decoder(DATA / "vae.pth"), load_t5(DATA / "text_encoder", 512)


def backbone(parts, case: dict) -> InfinityBackbone:
    models, decoder, text = parts
    return InfinityBackbone(models[case["lvl_embed"]], decoder, text, tau=case["tau"],
                            negative_prompt=REF["negative"] if case["negative"] else None)


def run_case(bb: InfinityBackbone, case: dict, callback=None):
    w_cfg, ratios = official_guidance(case["cfg"], K)
    return sample(bb, REF["prompts"][case["prompts"]], w_cfg=w_cfg, w_igg=None, schedule=ratios,
                  top_k=case["top_k"], top_p=case["top_p"], seed=case["seed"], with_signals=False,
                  drop_uncond=True, callback=callback)


def test_fixtures_are_the_real_256px_schedule():
    assert [(t, h, w) for t, h, w in REF["schedule"]] == [(1, s, s) for s in PATCH_NUMS]
    assert REF["commit"] == "4c27bbb" and len(REF["cases"]) == 11


def test_loads_strictly_and_infers_the_config(parts):
    models, decoder, _ = parts
    cfg = models["first"].cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.block_chunks, cfg.bits, cfg.text_dim, cfg.text_maxlen,
            cfg.pool_heads) == (64, 2, 2, 2, 16, 128, 512, 1)
    assert (decoder.cfg.bits, decoder.cfg.ch, decoder.cfg.ch_mult, decoder.cfg.upsample_levels) == (16, 24, (1, 1, 1),
                                                                                                   (1, 2))
    bb = load_infinity(DATA / "infinity.pth", DATA / "vae.pth", DATA / "text_encoder", patch_nums=PATCH_NUMS)
    assert isinstance(bb, BitwiseBackbone) and bb.bits_per_token == 16 and bb.vocab_size == 2 ** 16


def test_text_encoding_matches_the_official_encode_prompt(parts):
    states_BTX, lens_B = parts[2].encode(REF["prompts"][0])
    assert lens_B.tolist() == REF["encoding"]["lens"]
    compact = torch.cat([states_BTX[i, :n] for i, n in enumerate(lens_B.tolist())])
    torch.testing.assert_close(compact, REF["encoding"]["kv_compact"], atol=1e-5, rtol=0)
    assert parts[2].encode(REF["prompts"][1])[1].tolist() == REF["long_lens"] == [1, 512]   # empty; truncated


@pytest.mark.parametrize("i", range(len(REF["cases"])))
def test_same_bits_at_every_scale_and_same_image(parts, i):
    case = REF["cases"][i]
    res = run_case(backbone(parts, case), case)
    for k, (idx_Bl, ref_Bld) in enumerate(zip(res.indices, REF["bits"][i], strict=True)):
        got = bits_of(idx_Bl, 16).bool()
        assert torch.equal(got, ref_Bld), f"case {i} {case}: scale {k}: {(got != ref_Bld).sum()} bits differ"
    diff = (official_uint8(res.images).int() - REF["images"][i].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01      # uint8 truncation at a boundary only


def test_logits_and_float_image_of_the_first_case(parts):
    case, steps = REF["cases"][0], []
    res = run_case(backbone(parts, case), case, callback=steps.append)
    for step, ref_BlV in zip(steps, REF["logits"], strict=True):
        # float32 rounding (T5 pads to the longest prompt, the official code to 512: 8e-7 on the text features),
        # and now and then a bfloat16 rounding of the cross-attention that falls the other way (at most 1.6% of a
        # scale's logits, by up to 4e-3; no bit changes)
        close = torch.isclose(step.guided, ref_BlV, atol=1e-5, rtol=0)
        assert close.float().mean() > 0.98 and (step.guided - ref_BlV).abs().max() < 1e-2
    torch.testing.assert_close(res.images * 2 - 1, REF["image"], atol=1e-4, rtol=0)


def test_sampling_per_bits_is_a_no_op_at_the_pinned_commit():
    same = [c for c in REF["cases"] if c["sampling_per_bits"] == 4]
    twin = REF["cases"].index({**same[0], "sampling_per_bits": 1})
    assert all(torch.equal(a, b) for a, b in zip(REF["bits"][twin], REF["bits"][REF["cases"].index(same[0])],
                                                    strict=True))


def test_cross_attention_in_float32_changes_few_bits(parts):
    """What reproducing flash-attn's bfloat16 buys: in float32 the first case's logits move by up to ~1e-2 and a
    few bits flip (each flip then changes the later scales' inputs)."""
    case = REF["cases"][0]
    fp32 = load_infinity_model(DATA / "infinity.pth", PATCH_NUMS, text_attn_bf16=False)
    steps: list = []
    res = run_case(InfinityBackbone(fp32, parts[1], parts[2], tau=case["tau"]), case, callback=steps.append)
    first_diff = (steps[0].guided - REF["logits"][0]).abs().max().item()
    flipped = sum(int((bits_of(a, 16).bool() != b).sum()) for a, b in zip(res.indices, REF["bits"][0], strict=True))
    total = sum(b.numel() for b in REF["bits"][0])
    assert 1e-5 < first_diff < 5e-2 and flipped < 0.2 * total


def test_official_guidance_translation():
    assert official_guidance(3.0, 3) == (2.0, [1.0, 1.0, 1.0])
    assert official_guidance(1, 2) == (None, [None, None])
    assert official_guidance([1.0, 2.5, 4.0], 3) == (1.0, [None, 1.5, 3.0])
    with pytest.raises(ValueError, match="one per scale"):
        official_guidance([2.0, 3.0], 3)


@pytest.mark.parametrize("cfg", [4.0, 1.0, [1.0, 2.0, 3.0, 1.0, 4.0, 4.0, 5.0]])
def test_official_arguments_round_trip(cfg):
    args = infinity_args(*official_guidance(cfg, K), [0.5] * K, top_k=900, top_p=0.97, negative_prompt=None)
    assert (args.pn, args.cfg_list, args.tau_list, args.negative_prompt, args.cfg_insertion_layer) == (
        "0.06M", cfg, 0.5, "", [0])
    assert official_guidance(args.cfg_list, K) == official_guidance(cfg, K)


def test_our_schedules_as_official_arguments_sample_the_same_bits(parts):
    """A ramp (our linear schedule) and an interval become a per-scale cfg_list; sampled back through
    :func:`official_guidance`, they draw the same bits. The constant interval is the official ``[c, …, c, 1, …, 1]``."""
    bb, prompts = backbone(parts, REF["cases"][0]), ["a red cube", "two cats"]
    for schedule, start, end in (("linear", 0, None), ("interval", 2, 5), ("constant", 0, None),
                                 ("constant_interval", 0, 4)):
        ratios = Sampling(schedule=schedule, interval_start=start, interval_end=end).ratios(K)
        args = infinity_args(2.5, ratios, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], top_k=0, top_p=0.97,
                             negative_prompt="blurry")
        assert args.tau_list == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5] and args.negative_prompt == "blurry"
        assert isinstance(args.cfg_list, float) == (schedule == "constant")
        if schedule == "constant_interval":
            assert args.cfg_list == [3.5] * 4 + [1.0] * 3
        ours = sample(bb, prompts, w_cfg=2.5, w_igg=None, schedule=ratios, top_p=0.97, seed=1, with_signals=False)
        w_cfg, ratio_K = official_guidance(args.cfg_list, K)
        theirs = sample(bb, prompts, w_cfg=w_cfg, w_igg=None, schedule=ratio_K, top_p=0.97, seed=1,
                        with_signals=False)
        assert all(torch.equal(a, b) for a, b in zip(ours.indices, theirs.indices, strict=True)), schedule
    with pytest.raises(ValueError, match="per scale of a square schedule"):
        infinity_args(1.0, [1.0] * 3, [1.0] * 3, top_k=0, top_p=0.0, negative_prompt=None)


def test_sample_bits_reads_pairs_and_packs_msb_first():
    logits_BlV = torch.tensor([[[0.0, 9.0, 9.0, 0.0, 0.0, 9.0]]])    # bits 1, 0, 1
    assert sample_bits(logits_BlV, 3, top_k=1).tolist() == [[0b101]]
    assert bits_of(torch.tensor([[0b101]]), 3).tolist() == [[[1, 0, 1]]]
    with pytest.raises(ValueError, match="2·bits"):
        sample_bits(logits_BlV, 2)


def test_tau_and_schedule_are_checked(parts):
    with pytest.raises(ValueError, match="temperature"):
        InfinityBackbone(parts[0]["first"], parts[1], parts[2], tau=[1.0])
    with pytest.raises(ValueError, match="ratio"):
        sample(backbone(parts, REF["cases"][0]), ["a"], w_cfg=1.0, w_igg=None, schedule=[1.0])


def dense_attention(q_BLHc, k_BTHc, v_BTHc, scale):
    scores = torch.einsum("blhc,bthc->bhlt", q_BLHc.double(), k_BTHc.double()) * scale
    return torch.einsum("bhlt,bthc->blhc", scores.softmax(-1), v_BTHc.double()).float()


def test_flash_attn_stand_ins_equal_dense_attention():
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k, H, c = [3, 1, 4], [5, 2, 7], 2, 8
    qs = [torch.randn(n, H, c, generator=g) for n in lens_q]
    kvs = [torch.randn(n, 2, H, c, generator=g) for n in lens_k]
    cu_q = F.pad(torch.tensor(lens_q).cumsum(0), (1, 0)).int()
    cu_k = F.pad(torch.tensor(lens_k).cumsum(0), (1, 0)).int()
    scale = 1 / math.sqrt(c)
    out = flash_attn_varlen_kvpacked_func(torch.cat(qs), torch.cat(kvs), cu_q, cu_k, max(lens_q), max(lens_k),
                                          dropout_p=0, softmax_scale=scale)
    for i, (q, kv) in enumerate(zip(qs, kvs, strict=True)):
        expected = dense_attention(q[None], kv[None, :, 0], kv[None, :, 1], scale)[0]
        torch.testing.assert_close(out[int(cu_q[i]):int(cu_q[i + 1])], expected, atol=1e-5, rtol=1e-5)
    bf16 = flash_attn_varlen_kvpacked_func(torch.cat(qs).bfloat16(), torch.cat(kvs).bfloat16(), cu_q, cu_k,
                                           softmax_scale=scale)
    assert bf16.dtype == torch.bfloat16
    q, k, v = (torch.randn(2, 5, H, c, generator=g) for _ in range(3))
    torch.testing.assert_close(flash_attn_func(q, k, v, softmax_scale=scale), dense_attention(q, k, v, scale),
                               atol=1e-5, rtol=1e-5)


def test_backbone_kind_infinity_loads_through_the_config():
    from pipeline.backbones.load import checkpoint_keys, load_backbone, num_conditions
    from pipeline.config.schema import BackboneConfig

    b = BackboneConfig(name="tiny_infinity", kind="infinity", var_ckpt=str(DATA / "infinity.pth"),
                       vae_ckpt=str(DATA / "vae.pth"), text_encoder=str(DATA / "text_encoder"),
                       patch_nums=list(PATCH_NUMS), fid_reference="unused")
    assert checkpoint_keys(b) == ("vae_ckpt", "var_ckpt", "text_encoder") and num_conditions(b) is None
    bb = load_backbone(b)
    assert isinstance(bb, BitwiseBackbone) and bb.patch_nums == PATCH_NUMS


def test_igg_and_the_signals_run_on_bit_logits(parts):
    """IGG over bits (our extension): a token's nudge is its 2·d bit-logit difference, attended over the tokens of
    its scale exactly as VAR's codebook logits (pipeline.core.guidance.guide, unchanged)."""
    bb = backbone(parts, REF["cases"][0])
    steps = []
    res = sample(bb, ["a red cat"], w_cfg=None, w_igg=2.0, window=3, schedule="constant", top_p=0.97, seed=0,
                 callback=steps.append)
    assert len(res.signals) == K and res.images.shape == (1, 3, 64, 64)
    assert all(int(idx.min()) >= 0 and int(idx.max()) < 2 ** 16 for idx in res.indices)
    for step in steps:   # the proxy's signals are the bits' distributions' (pipeline.core.metrics), not a softmax
        bits = bit_pairs(step.guided, bb.bits_per_token)   # over all 2·d logits
        assert torch.equal(step.signals.vocab_evenness, vocab_evenness(bits).cpu())
        assert torch.equal(step.signals.div_uncond, divergence(bits, bit_pairs(step.uncond, bb.bits_per_token)).cpu())
        assert not torch.equal(step.signals.vocab_evenness, vocab_evenness(step.guided).cpu())


# ---- the sweep on Infinity ----------------------------------------------------------------------------------------

def infinity_overrides(tmp_path: Path) -> list[str]:
    """``backbone=infinity_2b`` pointed at the tiny random fixtures, at the 0.06M schedule (64 px images)."""
    from sweep_fixtures import write_prompts

    prompts = write_prompts(tmp_path / "prompts.csv", ["a red cube", "a dog", "green", "two cats"])
    return ["backbone=infinity_2b", f"backbone.var_ckpt={DATA / 'infinity.pth'}",
            f"backbone.vae_ckpt={DATA / 'vae.pth'}", f"backbone.text_encoder={DATA / 'text_encoder'}",
            f"backbone.prompts={prompts}", f"backbone.patch_nums=[{','.join(map(str, PATCH_NUMS))}]",
            f"root={tmp_path / 'runs'}", "guidance.schedule=constant"]


def test_a_whole_sweep_runs_on_the_tiny_infinity(tmp_path):
    """Plumbing only (random weights: the numbers mean nothing): proxy signals, screen, FID refinement and race with
    the CLIP score at tau 0.5 with a negative prompt; best.yaml in both forms; generate replays it; a best.yaml
    written before the official arguments existed still loads."""
    import contextlib
    import io

    import yaml
    from sweep_fixtures import t2i_sweep_overrides

    from pipeline import generate
    from pipeline.outputs.best import read_best
    from pipeline.sweep import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*infinity_overrides(tmp_path), "sweep.name=infinity-e2e", "backbone.negative_prompt=blurry",
                     *t2i_sweep_overrides(tmp_path)]) == 0
    best_path = Path(stdout.getvalue().splitlines()[-1].removeprefix("best: "))
    best = yaml.safe_load(best_path.read_text())
    assert best["backbone"] == "infinity_2b" and best["guidance"] == "cfg" and math.isfinite(best["fid"])
    assert set(best["checkpoints"]) == {"vae_ckpt", "var_ckpt", "text_encoder"}
    assert (best["sampling"]["tau"], best["sampling"]["negative_prompt"]) == ([0.5], "blurry")
    assert best["official"] == {"pn": "0.06M", "cfg_list": 1 + best["w_cfg"], "tau_list": 0.5, "top_k": 900,
                                "top_p": 0.97, "negative_prompt": "blurry", "cfg_insertion_layer": [0]}
    clip = best["clip_score"]
    assert 0 <= clip["low"] <= clip["value"] <= clip["high"] <= 100

    out = tmp_path / "winner"
    assert generate.main([f"generate.best={best_path}", "generate.num_images=2", f"generate.out={out}",
                          "generate.grid=2", "generate.device=cpu"]) == 0
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 64, 64, 3)

    for key in ("official",):
        best.pop(key)
    for key in ("tau", "negative_prompt"):
        best["sampling"].pop(key)
    best_path.write_text(yaml.safe_dump(best))
    old = read_best(best_path)
    assert old.official is None and (old.sampling.tau, old.sampling.negative_prompt) == ([1.0], None)


def test_tau_and_negative_prompt_are_sweep_settings(tmp_path):
    from pipeline.backbones.load import load_backbone
    from pipeline.config.schema import ConfigError, load_config

    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    overrides = [*infinity_overrides(tmp_path), f"backbone.fid_reference={tmp_path / 'stats.npz'}"]
    assert load_config(overrides).backbone.tau == [0.5]                       # infinity_2b: the official tau
    b = load_config([*overrides, "backbone.tau=[1,0.9,0.8,0.7,0.6,0.5,0.5]", "backbone.negative_prompt=blurry"]
                    ).backbone
    bb = load_backbone(b)
    assert (bb.tau_K, bb.negative_prompt) == ([1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], "blurry")
    for bad, match in (("backbone.tau=[0.5,1]", r"backbone\.tau=\[0\.5,1\.0\] must hold one positive temperature or "
                                                r"one per scale \(7\)"),
                       ("backbone.tau=[0]", r"backbone\.tau=\[0\.0\] must hold one positive"),
                       ("backbone.last_scale_temp=0.5", r"backbone\.last_scale_temp=0\.5 is Switti's"),
                       ("backbone.negative_prompt=' '", r"backbone\.negative_prompt is empty")):
        with pytest.raises(ConfigError, match=match) as err:
            load_config([*overrides, bad])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"backbone\.tau and backbone\.negative_prompt are Infinity's \(backbone\.kind"
                                          r"=var\)"):
        load_config([f"root={tmp_path}", "backbone=tiny", "backbone.negative_prompt=blurry"])


@pytest.mark.parametrize("name", ["infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth"])
def test_both_released_vae_file_names_load(tmp_path, name):
    """The 2B VAE circulates under two names; the file's contents decide, not its name."""
    (tmp_path / name).write_bytes((DATA / "vae.pth").read_bytes())
    ours, ref = load_bsq_decoder(tmp_path / name).state_dict(), load_bsq_decoder(DATA / "vae.pth").state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
