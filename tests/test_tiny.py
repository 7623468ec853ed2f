"""The embedded tiny backbone: training recipe (micro configuration) and the shipped checkpoint."""

import dataclasses

import pytest
import torch

from pipeline.backbones import tiny
from pipeline.backbones.tiny import (
    TINY_VAE,
    ClassifierStage,
    TinyConfig,
    VARStage,
    VQVAEStage,
    lr_at,
    restart_dead_codes,
    train_classifier,
    train_var,
    train_vqvae,
)
from pipeline.backbones.var import VARConfig, load_var
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.core.sampling import sample
from pipeline.data.classifier import ClassifierConfig, load_classifier
from pipeline.data.shapes import NUM_CLASSES, ShapesConfig, make_batch

MICRO_PATCH_NUMS = (1, 2, 4)


def micro_config(steps: int = 30) -> TinyConfig:
    """8x8 images, 4x4 latents: every stage of the recipe in a few seconds."""
    vae = VQVAEConfig(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      patch_nums=MICRO_PATCH_NUMS, using_sa=False, using_mid_sa=False, test_mode=False)
    var = VARConfig(vocab_size=32, z_channels=4, depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES,
                    patch_nums=MICRO_PATCH_NUMS)
    common = {"steps": steps, "batch_size": 16, "minutes": 5.0, "warmup_steps": 2}
    return TinyConfig(
        seed=0, checkpoint_every_s=3600, data=ShapesConfig(size=8),
        classifier=ClassifierStage(lr=5e-3, model=ClassifierConfig(width=8, feature_dim=16), eval_images=64,
                                   **common),
        vqvae=VQVAEStage(lr=3e-3, model=vae, restart_every=10, eval_images=64, **common),
        var=VARStage(lr=3e-3, model=var, **common),
    )


def _head_tail(losses: list[float], n: int = 8) -> tuple[float, float]:
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def test_lr_schedule_warmup_then_cosine():
    stage = VARStage(steps=100, batch_size=1, lr=1.0, minutes=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, stage) == pytest.approx(0.1)
    assert lr_at(9, 0.09, stage) == pytest.approx(1.0)
    assert lr_at(10, 0.0, stage) == pytest.approx(1.0)
    assert lr_at(50, 0.5, stage) == pytest.approx(0.55)
    assert lr_at(99, 1.0, stage) == pytest.approx(0.1)
    assert lr_at(99, 2.0, stage) == pytest.approx(0.1)


def test_micro_recipe_reduces_every_loss_and_writes_loadable_weights(tmp_path):
    torch.set_num_threads(1)
    cfg = micro_config()
    log = train_classifier(cfg, tmp_path / "clf.pt", hue_random=False, progress=False)
    first, last = _head_tail(log.losses)
    assert last < first and log.steps_done == cfg.classifier.steps and not log.stopped_early
    assert load_classifier(tmp_path / "clf.pt").features(make_batch(torch.arange(2), 0, config=cfg.data)).shape \
        == (2, 16)

    _, log = train_vqvae(cfg, tmp_path / "vae.pt", progress=False)
    first, last = _head_tail(log.losses)
    assert last < first and 0 < log.metrics["psnr_db"] < 100

    vae = tiny.load_vqvae(tmp_path / "vae.pt", MICRO_PATCH_NUMS)
    var, log = train_var(cfg, vae, tmp_path / "var.pt", progress=False)
    first, last = _head_tail(log.losses)
    assert last < first

    backbone = load_var(tmp_path / "vae.pt", tmp_path / "var.pt")
    assert backbone.patch_nums == MICRO_PATCH_NUMS and backbone.num_classes == NUM_CLASSES
    assert torch.equal(backbone.var.head.weight, var.head.weight)
    result = sample(backbone, [0, 7], w_cfg=1.0, w_igg=None, seed=0)
    assert result.images.shape == (2, 3, 8, 8)


def test_training_is_reproducible_from_the_seed(tmp_path):
    torch.set_num_threads(1)
    cfg = micro_config(steps=5)
    a = train_classifier(cfg, tmp_path / "a.pt", hue_random=True, progress=False).losses
    b = train_classifier(cfg, tmp_path / "b.pt", hue_random=True, progress=False).losses
    c = train_classifier(dataclasses.replace(cfg, seed=1), tmp_path / "c.pt", hue_random=True,
                         progress=False).losses
    assert a == b and a != c


def test_tokenizer_and_transformer_files_are_reproducible_from_the_seed(tmp_path):
    torch.set_num_threads(1)
    cfg = micro_config(steps=5)
    for run in ("a", "b"):
        train_vqvae(cfg, tmp_path / f"vae_{run}.pt", progress=False)
        vae = tiny.load_vqvae(tmp_path / f"vae_{run}.pt", MICRO_PATCH_NUMS)
        train_var(cfg, vae, tmp_path / f"var_{run}.pt", progress=False)
    for name in ("vae", "var"):
        sd_a, sd_b = (torch.load(tmp_path / f"{name}_{run}.pt", weights_only=True) for run in ("a", "b"))
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), name


def test_wall_clock_budget_stops_a_stage_and_still_saves(tmp_path):
    cfg = micro_config(steps=10_000)
    cfg.classifier = dataclasses.replace(cfg.classifier, minutes=1e-4)
    log = train_classifier(cfg, tmp_path / "clf.pt", hue_random=False, progress=False)
    assert log.stopped_early and log.steps_done < 10_000 and (tmp_path / "clf.pt").is_file()


def test_dead_codes_move_onto_residuals():
    cfg = micro_config()
    torch.manual_seed(0)
    vae = tiny.VQVAE(cfg.vqvae.model)
    q = vae.quantize
    q.ema_vocab_hit_SV.fill_(1.0)
    q.ema_vocab_hit_SV[:, :5] = 0.0
    before = q.embedding.weight.detach().clone()
    images = make_batch(torch.arange(8), 0, config=cfg.data)
    candidates = tiny.residual_candidates(vae, images)
    moved = restart_dead_codes(vae, images, 0.5, torch.Generator().manual_seed(0))
    assert moved == 5
    assert torch.equal(q.embedding.weight[5:], before[5:])
    for v in q.embedding.weight[:5]:
        assert (candidates - v).abs().amax(1).min() < 1e-6
    assert restart_dead_codes(vae, images, 0.5, torch.Generator().manual_seed(0)) == 0


def test_cli_rejects_bad_budget(capsys):
    assert tiny.main(["train", "var", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("size", list(tiny.VAR_SIZES))
def test_shipped_tiny_checkpoint_loads_and_samples(size):
    """Both embedded backbones (tiny, tiny_small) are shipped, load on the one tokenizer, and sample."""
    depth, width, _, path = tiny.VAR_SIZES[size]
    backbone = load_var(TINY_VAE, path)
    assert (backbone.var.cfg.depth, backbone.var.cfg.embed_dim) == (depth, width)
    assert backbone.patch_nums == tiny.tiny_var_config(size).patch_nums
    assert backbone.num_classes == NUM_CLASSES and backbone.vocab_size == tiny.tiny_var_config().vocab_size
    result = sample(backbone, list(range(NUM_CLASSES)), w_cfg=2.0, w_igg=None, seed=0)
    assert result.images.shape == (NUM_CLASSES, 3, 32, 32)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    assert [i.shape[1] for i in result.indices] == [pn * pn for pn in backbone.patch_nums]
    again = sample(backbone, list(range(NUM_CLASSES)), w_cfg=2.0, w_igg=None, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(result.indices, again.indices, strict=True))


def test_shipped_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in TINY_VAE.parent.glob("*.pt"))
    assert total <= 20 * 2**20


def test_num_conditions_is_the_checkpoint_s_class_count():
    from pipeline.backbones.load import load_backbone, num_conditions
    from pipeline.config.schema import load_config

    for size in tiny.VAR_SIZES:
        b = load_config([f"backbone={size}"]).backbone
        assert num_conditions(b) == load_backbone(b).num_classes == 8
