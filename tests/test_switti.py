"""Switti: token parity with the official pipeline, the released layout, loading, guidance controls in the sampler.

The fixtures under tests/data/switti (tiny random Switti, Switti-AR, VQVAE and CLIP text towers in the Hub layout,
and the official pipeline's tokens and images) were made by tests/switti_reference.py from yandex-research/switti.
"""

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from sweep_fixtures import t2i_sweep_overrides, tiny_clip, write_prompts

from pipeline.backbones.base import ScaleWiseBackbone, TextToImageBackbone
from pipeline.backbones.switti import (
    PATCH_NUMS,
    Switti,
    SwittiConfig,
    load_switti,
    scale_buffers,
    switti_config_from_state_dict,
)
from pipeline.backbones.var import VARConfig, random_var
from pipeline.backbones.vqvae import VQVAE, VQVAEConfig
from pipeline.core.sampling import sample

DATA = Path(__file__).parent / "data" / "switti"
REF = torch.load(DATA / "reference.pt", weights_only=True)
K = len(REF["patch_nums"])
FOLDERS = ("vae", "text_encoder", "text_encoder_2")


def load(model: str = "switti", root: Path = DATA):
    return load_switti(root / model, *(root / f for f in FOLDERS))


BACKBONES = {m: load(m) for m in ("switti", "switti_ar")}


def official_args(case: dict) -> dict:
    """Our sampler's arguments for one official pipeline call."""
    return dict(w_cfg=case["cfg"], w_igg=None, schedule="interval", interval_start=min(case["turn_on"], K),
                interval_end=min(case["turn_off"], K), top_k=case["top_k"], top_p=case["top_p"], seed=case["seed"],
                last_scale_temp=case["last_scale_temp"], drop_uncond=True)


def case_id(case: dict) -> str:
    return (f"{case['model']}-cfg{case['cfg']:g}-on{case['turn_on']}-off{case['turn_off']}"
            f"-k{case['top_k']}-p{case['top_p']:g}-t{case['last_scale_temp']}-s{case['seed']}")


@pytest.mark.parametrize("i", range(len(REF["cases"])), ids=[case_id(c) for c in REF["cases"]])
def test_tokens_and_images_equal_the_official_pipeline(i):
    case = REF["cases"][i]
    result = sample(BACKBONES[case["model"]], REF["prompts"][case["prompts"]], with_signals=False,
                    **official_args(case))
    assert len(result.indices) == K
    for k, (ours, theirs) in enumerate(zip(result.indices, REF["tokens"][i], strict=True)):
        assert torch.equal(ours, theirs), f"scale {k}"
    torch.testing.assert_close(result.images, REF["images"][i], rtol=0, atol=1e-5)


def test_parity_cases_hold_the_empty_and_reversed_on_off_ranges():
    """The official pipeline's edge cases are in the fixtures: on == off > 0 with a temperature and a sampled top-k
    (it divides by the temperature from that scale on only), and on > off (it guides no scale)."""
    cases = REF["cases"]
    assert any(0 < c["turn_on"] == c["turn_off"] < K and c["last_scale_temp"] and c["top_k"] != 1 for c in cases)
    assert any(c["turn_on"] > c["turn_off"] and c["last_scale_temp"] and c["top_k"] != 1 for c in cases)


def test_prompt_encoding_equals_the_official_one():
    enc = BACKBONES["switti"].encode(REF["encoding"]["prompts"])
    # float sums differ in the last bits between CPUs (their SIMD kernels); the tokens above stay exact
    torch.testing.assert_close(enc.context_BTX, REF["encoding"]["context"], rtol=0, atol=1e-5)
    torch.testing.assert_close(enc.pooled_BP, REF["encoding"]["pooled"], rtol=0, atol=1e-5)
    assert torch.equal(enc.bias_BT, REF["encoding"]["bias"])
    B = len(REF["encoding"]["prompts"])
    assert enc.context_BTX.shape == (2 * B, 77, 32 + 48) and enc.pooled_BP.shape == (2 * B, 48)
    assert torch.isinf(enc.bias_BT).any() and (enc.bias_BT[:, 0] == 0).all()      # padding masked, BOS kept


@pytest.mark.parametrize(("depth", "reso", "use_ar"), [(24, 512, False), (24, 512, True), (30, 1024, False),
                                                       (30, 1024, True)])
def test_layout_equals_the_released_classes_on_meta_device(depth, reso, use_ar):
    """SwittiHF(depth, reso, use_ar) of the official code: width 64·depth, depth heads, real text widths."""
    name = f"switti_d{depth}_{reso}{'_ar' if use_ar else ''}"
    with torch.device("meta"):
        model = Switti(SwittiConfig(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=PATCH_NUMS[reso],
                                    use_ar=use_ar))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == REF["layouts"][name]
    sd = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    sd["lvl_1L"], sd["attn_bias_for_masking"] = scale_buffers(PATCH_NUMS[reso], use_ar)
    inferred = switti_config_from_state_dict(sd, {"depth": depth})
    assert inferred == model.cfg


def test_vae_layout_equals_the_released_vqvae():
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig(patch_nums=PATCH_NUMS[1024]))
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == REF["layouts"]["vqvae_1024"]


def test_config_inferred_from_the_fixtures():
    sw, ar = BACKBONES["switti"].switti.cfg, BACKBONES["switti_ar"].switti.cfg
    assert (sw.use_ar, ar.use_ar) == (False, True)
    assert sw.patch_nums == tuple(REF["patch_nums"]) and sw.context_dim == 80 and sw.pooled_dim == 48
    assert sw.rope and sw.swiglu and sw.crop_cond and sw.num_heads == 2 and sw.depth == 2
    bb = BACKBONES["switti"]
    assert isinstance(bb, TextToImageBackbone) and not isinstance(bb, ScaleWiseBackbone)
    assert bb.null_prompt == "" and bb.vocab_size == 64


@pytest.mark.parametrize("model", ["switti", "switti_ar"])
def test_sampled_logits_equal_teacher_forced_logits(model):
    """The rollout (cached text keys, AR KV cache, scale-by-scale RoPE) and the all-scales forward agree."""
    bb = BACKBONES[model]
    prompts = ["a red cube", "two dogs"]
    steps = []
    result = sample(bb, prompts, w_cfg=3.0, w_igg=1.0, seed=0, callback=steps.append)
    enc = bb.encode(prompts)
    with torch.no_grad():
        x = bb.vae.idxBl_to_var_input(result.indices)
        logits = bb.switti(x.repeat(2, 1, 1), enc.context_BTX, enc.pooled_BP, enc.bias_BT)
    for step, (begin, end) in zip(steps, bb.switti.begin_ends, strict=True):
        torch.testing.assert_close(step.cond, logits[:2, begin:end], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.uncond, logits[2:, begin:end], rtol=1e-5, atol=1e-5)


def reference_guidance(cond, uncond, w_cfg, w_igg, ratio):
    """uncond + (1 + r·w)Δ + (1 + r·w′)·softmax(ΔΔᵀ/√V)·Δ, written out (a None weight drops its term)."""
    delta = cond.double() - uncond.double()
    out = uncond.double().clone()
    if w_cfg is not None:
        out += (1 + ratio * w_cfg) * delta
    if w_igg is not None:
        attn = torch.softmax(delta @ delta.transpose(1, 2) / math.sqrt(delta.shape[-1]), dim=-1)
        out += (1 + ratio * w_igg) * (attn @ delta)
    return out


@pytest.mark.parametrize(("w_cfg", "w_igg"), [(None, 3.0), (4.0, 2.0), (6.0, None)])
@pytest.mark.parametrize("model", ["switti", "switti_ar"])
def test_igg_and_mixed_inside_the_cfg_interval(model, w_cfg, w_igg):
    steps = []
    start, end, temp = 1, 4, 0.5
    result = sample(BACKBONES[model], ["a red cube", "the blue sphere"], w_cfg=w_cfg, w_igg=w_igg, window=None,
                    schedule="interval", interval_start=start, interval_end=end, top_k=8, top_p=0.9, seed=3,
                    last_scale_temp=temp, drop_uncond=True, callback=steps.append)
    assert len(result.signals) == K
    for step in steps:
        if step.k < start:
            assert step.ratio is None and torch.equal(step.guided, step.cond.float())
            assert not torch.equal(step.cond, step.uncond)
        elif step.k < end:
            assert step.ratio == pytest.approx(step.k / (K - 1))
            expected = reference_guidance(step.cond, step.uncond, w_cfg, w_igg, step.ratio)
            torch.testing.assert_close(step.guided.double(), expected, rtol=1e-5, atol=1e-5)
        else:     # after the off-scale: no unconditional rows, the temperature divides the logits
            assert step.ratio is None and step.uncond is step.cond
            torch.testing.assert_close(step.guided, step.cond.float() / temp, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["switti", "switti_ar"])
def test_dropping_the_unconditional_half_keeps_the_tokens(model):
    kw = dict(w_cfg=4.0, w_igg=1.0, schedule="interval", interval_start=0, interval_end=2, top_k=8, seed=5,
              with_signals=False)
    prompts = ["a red cube", "a dog", "green"]
    dropped = sample(BACKBONES[model], prompts, drop_uncond=True, **kw)
    kept = sample(BACKBONES[model], prompts, drop_uncond=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(dropped.indices, kept.indices, strict=True))
    torch.testing.assert_close(dropped.images, kept.images, rtol=0, atol=1e-6)


def test_dropping_the_unconditional_half_on_var_keeps_the_tokens():
    pn = (1, 2, 3, 4)
    bb = random_var(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=pn),
                    VARConfig(vocab_size=64, z_channels=8, depth=2, embed_dim=64, num_heads=2, num_classes=10,
                              patch_nums=pn))
    kw = dict(w_cfg=3.0, w_igg=None, schedule="interval", interval_start=0, interval_end=2, top_k=4, seed=1)
    a = sample(bb, [1, 2, 3], drop_uncond=True, **kw)
    b = sample(bb, [1, 2, 3], drop_uncond=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))


def test_conditions_must_fit_the_backbone():
    with pytest.raises(ValueError, match="text-to-image: pass one prompt"):
        sample(BACKBONES["switti"], [1, 2], w_cfg=1.0, w_igg=None)
    with pytest.raises(ValueError, match="last_scale_temp"):
        sample(BACKBONES["switti"], ["a"], w_cfg=1.0, w_igg=None, last_scale_temp=0.0)
    pn = (1, 2)
    var = random_var(VQVAEConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1,), num_res_blocks=1, patch_nums=pn),
                     VARConfig(vocab_size=16, z_channels=8, depth=1, embed_dim=32, num_heads=2, num_classes=4,
                               patch_nums=pn))
    with pytest.raises(ValueError, match="class-conditional: pass class labels"):
        sample(var, ["a cat"], w_cfg=1.0, w_igg=None)
    one = sample(BACKBONES["switti"], "a single prompt", w_cfg=1.0, w_igg=None, seed=0)   # a str is one prompt
    assert one.images.shape == (1, 3, 6, 6)


def copy_fixtures(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    shutil.copytree(DATA, root, ignore=shutil.ignore_patterns("reference.pt"))
    return root


def test_missing_files_name_themselves(tmp_path):
    root = copy_fixtures(tmp_path)
    (root / "switti" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"^switti .*switti: missing model\.safetensors or pytorch_model\.bin; "
                                         r"download yresearch/Switti"):
        load(root=root)
    root = copy_fixtures(tmp_path / "2")
    (root / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"^text_encoder_2 .*: missing config\.json; download laion/CLIP-ViT-bigG"):
        load(root=root)
    root = copy_fixtures(tmp_path / "3")
    (root / "text_encoder" / "tokenizer.json").unlink()
    (root / "text_encoder" / "merges.txt").unlink()
    with pytest.raises(ValueError, match=r"^text_encoder .*: missing merges\.txt \(or tokenizer\.json\)"):
        load(root=root)
    with pytest.raises(ValueError, match=r"^vae .*nowhere: not a folder; download yresearch/VQVAE-Switti"):
        load_switti(root / "switti", tmp_path / "nowhere", root / "text_encoder", root / "text_encoder_2")


def test_bad_checkpoints_are_refused(tmp_path):
    root = copy_fixtures(tmp_path)
    config = json.loads((root / "switti" / "config.json").read_text())
    (root / "switti" / "config.json").write_text(json.dumps({**config, "use_ar": True}))
    with pytest.raises(ValueError, match=r"config\.json says use_ar=True but attn_bias_for_masking is block-diagonal"):
        load(root=root)
    with pytest.raises(ValueError, match=r"text encoders \(hidden 48 \+ 32\) do not fit"):
        load_switti(DATA / "switti", DATA / "vae", DATA / "text_encoder_2", DATA / "text_encoder")
    with pytest.raises(ValueError, match=r"^switti .*vae: not a switti checkpoint \(missing"):
        load_switti(DATA / "vae", DATA / "vae", DATA / "text_encoder", DATA / "text_encoder_2")


def test_pytorch_model_bin_is_read_weights_only(tmp_path):
    from safetensors.torch import load_file

    root = copy_fixtures(tmp_path)
    sd = load_file(root / "switti" / "model.safetensors")
    (root / "switti" / "model.safetensors").unlink()
    torch.save(sd, root / "switti" / "pytorch_model.bin")
    bb = load(root=root)
    case = REF["cases"][4]
    result = sample(bb, REF["prompts"][case["prompts"]], with_signals=False, **official_args(case))
    assert all(torch.equal(a, b) for a, b in zip(result.indices, REF["tokens"][4], strict=True))
    torch.save(argparse.Namespace(weights=sd), root / "switti" / "pytorch_model.bin")    # an arbitrary object
    with pytest.raises(ValueError, match=r"torch\.load\(weights_only=True\) refused"):
        load(root=root)


def test_rollout_order_is_enforced():
    rollout = BACKBONES["switti_ar"].start(["a"])
    with pytest.raises(RuntimeError, match="take"):
        rollout.take(torch.zeros(1, 1, dtype=torch.int64))
    rollout.logits()
    with pytest.raises(RuntimeError, match="alternate"):
        rollout.logits()
    with pytest.raises(RuntimeError, match="drop_uncond"):
        rollout.drop_uncond()
    with pytest.raises(RuntimeError, match="decode"):
        rollout.decode()


# ---- sweep plumbing: prompt sets, configuration, the generate command -----------------------------------------

def test_prompt_sets_are_read_and_spread_deterministically(tmp_path):
    from pipeline.core.sampling import Sampling, spread_prompts, sweep_conditions
    from pipeline.data.prompts import read_prompts

    prompts = ["a cat", 'a "quoted", comma prompt', "a dog", "snow", "the sea"]
    path = write_prompts(tmp_path / "p.csv", prompts)
    assert read_prompts(path) == tuple(prompts)
    spread = spread_prompts(10, read_prompts(path))
    assert sorted(spread[:5]) == sorted(prompts) and spread[5:] == spread[:5]    # every prompt once per 5 images
    assert spread_prompts(3, prompts) == spread[:3]                               # a prefix of a larger draw
    assert sweep_conditions(BACKBONES["switti"], 4, Sampling(prompts=str(path))) == spread[:4]
    with pytest.raises(ValueError, match=r"needs a prompt set: set backbone\.prompts"):
        sweep_conditions(BACKBONES["switti"], 4, Sampling())
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv: no prompt column"):
        read_prompts(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="not found"):
        read_prompts(tmp_path / "none.csv")


def switti_overrides(tmp_path: Path) -> list[str]:
    import numpy as np

    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    prompts = write_prompts(tmp_path / "prompts.csv", ["a red cube", "a dog", "green", "two cats"])
    return ["backbone=switti", f"backbone.var_ckpt={DATA / 'switti'}", f"backbone.vae_ckpt={DATA / 'vae'}",
            f"backbone.text_encoder={DATA / 'text_encoder'}", f"backbone.text_encoder_2={DATA / 'text_encoder_2'}",
            f"backbone.prompts={prompts}", f"backbone.patch_nums=[{','.join(map(str, REF['patch_nums']))}]",
            f"backbone.fid_reference={tmp_path / 'stats.npz'}", f"root={tmp_path / 'runs'}"]


def test_switti_configuration_validates_and_loads(tmp_path):
    from pipeline.backbones.load import checkpoint_keys, load_backbone
    from pipeline.config.schema import ConfigError, load_config
    from pipeline.core.sampling import Sampling

    overrides = switti_overrides(tmp_path)
    cfg = load_config([*overrides, "backbone.last_scale_temp=0.5", "guidance.schedule=interval",
                       "guidance.schedule_end=3"])
    assert checkpoint_keys(cfg.backbone) == ("vae_ckpt", "var_ckpt", "text_encoder", "text_encoder_2")
    sampling = Sampling.of(cfg)
    assert (sampling.interval_end, sampling.last_scale_temp, sampling.drop_uncond) == (3, 0.5, True)
    assert sampling.prompts == cfg.backbone.prompts
    bb = load_backbone(cfg.backbone)
    assert isinstance(bb, TextToImageBackbone) and bb.patch_nums == tuple(REF["patch_nums"])
    with pytest.raises(ConfigError, match=r"backbone\.text_encoder_2: .*nowhere is not a folder"):
        load_config([*overrides, f"backbone.text_encoder_2={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"backbone\.last_scale_temp=0\.0 must be positive"):
        load_config([*overrides, "backbone.last_scale_temp=0"])
    with pytest.raises(ConfigError, match=r"backbone\.kind=dit is unknown"):
        load_config([*overrides, "backbone.kind=dit"])


def test_generate_command_samples_a_switti_candidate(tmp_path, capsys):
    import numpy as np

    from pipeline import generate

    out = tmp_path / "out"
    code = generate.main([*switti_overrides(tmp_path), "generate.w_cfg=6", "generate.w_igg=1", "generate.num_images=3",
                          "generate.grid=3", "confirm.batch_size=2", "generate.device=cpu", f"generate.out={out}",
                          "guidance.schedule=interval", "guidance.schedule_end=3", "backbone.last_scale_temp=0.5"])
    assert code == 0, capsys.readouterr().err
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (3, 6, 6, 3) and arr.dtype == np.uint8 and (out / "grid.png").is_file()


def upsampling_vae(folder: Path) -> Path:
    """The fixture's quantizer with a random decoder that upsamples 4x (24 px images: the FID extractor's minimum)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(DATA / "vae" / "model.safetensors")
    cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                      patch_nums=tuple(REF["patch_nums"]), using_sa=False, using_mid_sa=False)
    torch.manual_seed(0)
    state = VQVAE(cfg).state_dict()
    state.update({k: v for k, v in sd.items() if k.startswith(("quantize.", "quant_conv.", "post_quant_conv."))})
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def sweep_overrides(tmp_path: Path) -> list[str]:
    """A small Switti sweep (random weights: the numbers mean nothing) with the micro sweep's FID extractor."""
    return [*switti_overrides(tmp_path), f"backbone.vae_ckpt={upsampling_vae(tmp_path / 'vae24')}",
            "sweep.name=switti-e2e", "guidance.schedule=interval", "guidance.schedule_end=4",
            "backbone.last_scale_temp=0.5", "search.intervals=[[0,4],[1,null]]", *t2i_sweep_overrides(tmp_path)]


def test_the_sweep_worker_runs_proxy_and_fid_jobs_on_switti(tmp_path):
    import numpy as np

    from pipeline.config.schema import load_config
    from pipeline.core.sampling import Sampling, seeded_batches, sweep_conditions
    from pipeline.fid.clip_score import ClipScorer
    from pipeline.preflight import fid_reference
    from pipeline.runtime.distributed import Worker, worker_files
    from tuners.jobs import Job
    from tuners.space import Candidate

    cfg = load_config(sweep_overrides(tmp_path))
    reference = fid_reference(cfg)[1]
    assert {k for k, _ in worker_files(cfg, reference)} >= {"backbone.text_encoder", "backbone.prompts"}
    worker = Worker(cfg, reference)
    proxy = worker.evaluate(Job(Candidate(4.0, 1.0, None), num_images=8, seed=2))
    assert proxy.error is None and proxy.num_images == 8
    fid = worker.evaluate(Job(Candidate(4.0, None, None), num_images=24, seed=3, fid=True))
    assert fid.error is None and fid.features["features"].shape == (24, 16)
    on = [worker.evaluate(Job(Candidate(4.0, None, None, interval=(1, 3)), num_images=24, seed=3, fid=True))
          for _ in range(2)]  # the candidate's own on/off scales (the first unguided), the same draws twice
    assert np.array_equal(on[0].features["features"], on[1].features["features"])
    assert not np.array_equal(on[0].features["features"], fid.features["features"])
    assert Sampling.of(cfg).guiding((1, 3)) == dataclasses.replace(Sampling.of(cfg), interval_start=1, interval_end=3)
    assert Sampling.of(cfg).guiding(None) == Sampling.of(cfg)
    images = torch.cat([r.images for _, r in seeded_batches(worker.backbone, 4.0, None, None, num_images=24,
                                                            batch_size=24, seed=3, sampling=Sampling.of(cfg))])
    assert images.shape == (24, 3, 24, 24)
    clip = ClipScorer(cfg.confirm.clip_weights)(images, sweep_conditions(worker.backbone, 24, Sampling.of(cfg)))
    assert torch.allclose(torch.from_numpy(fid.features["clip_score"][:, 0]), clip, atol=1e-4)  # each image's own


def test_a_whole_sweep_runs_on_the_tiny_switti(tmp_path):
    """Plumbing only (random weights: the numbers mean nothing): proxy signals, FID refinement and race, best.yaml."""
    import contextlib
    import io

    import yaml

    from pipeline.sweep import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(sweep_overrides(tmp_path)) == 0
    best_path = Path(stdout.getvalue().splitlines()[-1].removeprefix("best: "))
    best = yaml.safe_load(best_path.read_text())
    assert best["backbone"] == "switti" and best["guidance"] == "cfg" and math.isfinite(best["fid"])
    assert best["sampling"]["drop_uncond"] is True and best["sampling"]["last_scale_temp"] == 0.5
    assert set(best["checkpoints"]) == {"vae_ckpt", "var_ckpt", "text_encoder", "text_encoder_2"}
    assert "prompts.csv" in best["sampling"]["labels"]
    assert best["interval"] in ([0, 4], [1, None])  # searched: the winner's on/off scales, which generate replays
    assert [best["sampling"]["schedule_start"], best["sampling"]["schedule_end"]] == best["interval"]
    clip = best["clip_score"]  # the winner's CLIP score at its N, with its interval
    assert 0 <= clip["low"] <= clip["value"] <= clip["high"] <= 100


def test_clip_score_of_prompt_image_pairs(tmp_path):
    from pipeline.fid.clip_score import ClipScorer

    scorer = ClipScorer(tiny_clip(tmp_path / "clip"))
    prompts = ["a red cube", "a dog", "green"]
    images = sample(BACKBONES["switti"], prompts, w_cfg=6.0, w_igg=None, seed=0).images
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 100)).all()
    torch.testing.assert_close(scorer(images[:1], prompts[:1]), scores[:1], rtol=1e-4, atol=1e-4)  # per image
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(images, prompts[:2])
    with pytest.raises(ValueError, match=r"missing preprocessor_config\.json"):
        ClipScorer(DATA / "text_encoder")
