"""The embedded ("tiny") backbone: its configuration and the recipe that trained the shipped weights.

A VAR (same code as the full-size models) on the procedural shapes of :mod:`pipeline.data.shapes`: 32x32
images, patch_nums (1, 2, 3, 4, 5, 6, 8), a small multi-scale VQVAE tokenizer, a 4-block transformer trained with
10 % label dropout to the null class, plus the two shape classifiers that judge its samples. Reproduce the
shipped files (pipeline/backbones/weights/) on a CPU (79 minutes on 2 idle cores; ``--device cuda`` runs the
same recipe in minutes, not bit-identically) with::

    python -m pipeline.backbones.tiny train all                 # every stage, in order
    python -m pipeline.backbones.tiny train var --minutes 60    # one stage, with a wall-clock cap

Each stage runs a fixed number of steps (``--steps``), stops early only if its wall-clock budget runs out (then it
says so), saves its weights every few minutes and at the end, and seeds every batch from ``--seed`` and the step.
On a CPU shared with other jobs, prefix the command with ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that
spin-wait lose most of their time to the other processes (measured here: a VAR step took 1.9 s with 2 passive
threads, 5.0 s with 1 thread and 18 s with 2 spinning threads, at a load average of 10 on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.backbones.var import VAR, VARConfig
from pipeline.backbones.vqvae import VQVAE, VQVAEConfig, vqvae_config_from_state_dict
from pipeline.data.classifier import (
    WEIGHTS_DIR,
    ClassifierConfig,
    ShapeClassifier,
    real_accuracy,
    save_classifier,
)
from pipeline.data.files import atomic_write
from pipeline.data.shapes import NUM_CLASSES, ShapesConfig, make_batch, random_labels

TINY_VAE = WEIGHTS_DIR / "tiny_vae.pt"
TINY_VAR = WEIGHTS_DIR / "tiny_var.pt"
# Transformer sizes of the embedded backbones (one tokenizer and one classifier serve both): name -> (depth, width,
# heads, weight file). `tiny` is the default; `tiny_small`, the same recipe at a fifth of the parameters, is the
# second backbone of a per-backbone sweep (`-m backbone=tiny,tiny_small`).
VAR_SIZES = {"tiny": (4, 192, 3, TINY_VAR), "tiny_small": (2, 128, 2, WEIGHTS_DIR / "tiny_small_var.pt")}
STAGES = ("classifier", "vqvae", "var")
EVAL_SEED_OFFSET = 10**9  # evaluation images are drawn from seeds far away from every training batch's


def tiny_vqvae_config(*, test_mode: bool = True) -> VQVAEConfig:
    """The tokenizer: V=512, Cvae=16, ch=32, ch_mult (1, 2, 2) -> 8x8 latents for 32x32 images."""
    return VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                       patch_nums=(1, 2, 3, 4, 5, 6, 8), test_mode=test_mode)


def tiny_var_config(size: str = "tiny") -> VARConfig:
    """The transformer of `size` (:data:`VAR_SIZES`; tiny: 4 AdaLN blocks of width 192, 3 heads of 64), 8 classes
    + the null class."""
    vae = tiny_vqvae_config()
    depth, width, heads, _ = VAR_SIZES[size]
    return VARConfig(vocab_size=vae.vocab_size, z_channels=vae.z_channels, depth=depth, embed_dim=width,
                     num_heads=heads, num_classes=NUM_CLASSES, patch_nums=vae.patch_nums, cond_drop_rate=0.1,
                     drop_path_rate=0.0)


@dataclass
class StageConfig:
    """Optimisation of one stage: AdamW, linear warm-up then cosine decay to ``lr * min_lr_ratio``."""

    steps: int
    batch_size: int
    lr: float
    minutes: float                  # wall-clock cap; the stage stops early (and says so) past it
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0


@dataclass
class ClassifierStage(StageConfig):
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval_images: int = 2000


@dataclass
class VQVAEStage(StageConfig):
    model: VQVAEConfig = field(default_factory=lambda: tiny_vqvae_config(test_mode=False))
    restart_every: int = 25         # dead-code restart period (steps)
    restart_until: float = 0.8      # ... during this fraction of the run
    dead_hits: float = 0.05         # a code is dead if its EMA hits summed over scales fall below this
    eval_images: int = 1000


@dataclass
class VARStage(StageConfig):
    model: VARConfig = field(default_factory=tiny_var_config)


@dataclass
class TinyConfig:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"             # "cuda" trains the same recipe faster (not bit-identical to the CPU run)
    checkpoint_every_s: float = 180.0
    data: ShapesConfig = field(default_factory=ShapesConfig)
    # Step counts and wall-clock caps fit 90 minutes on 2 idle CPU cores (docs/BENCHMARKS.md, Embedded backbone).
    classifier: ClassifierStage = field(default_factory=lambda: ClassifierStage(
        steps=1000, batch_size=64, lr=2e-3, minutes=4.5, weight_decay=5e-4))
    vqvae: VQVAEStage = field(default_factory=lambda: VQVAEStage(
        steps=1500, batch_size=32, lr=2e-3, minutes=23.0))
    var: VARStage = field(default_factory=lambda: VARStage(
        steps=1650, batch_size=64, lr=1.5e-3, minutes=57.0, weight_decay=0.05, warmup_steps=100))


@dataclass
class TrainLog:
    losses: list[float]
    steps_done: int
    seconds: float
    stopped_early: bool
    metrics: dict[str, float] = field(default_factory=dict)


def lr_at(step: int, progress: float, stage: StageConfig) -> float:
    """Learning rate: linear warm-up over the first steps, then cosine from ``lr`` to ``lr * min_lr_ratio``.

    ``progress`` in [0, 1] is how far the stage is: the larger of its step and wall-clock fractions, so a run cut
    short by its budget still anneals (with the steps binding, the run is exactly reproducible).
    """
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    floor = stage.lr * stage.min_lr_ratio
    return floor + (stage.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_seed(seed: int, stage: str, step: int) -> int:
    """Seed of the training batch of ``step`` in ``stage`` (distinct per stage, far from the eval seeds)."""
    return (seed * len(STAGES) + STAGES.index(stage)) * 10_000_019 + step


def save_state(state: dict[str, Tensor], path: Path) -> None:
    """Write a state dict (tensors moved to the CPU) atomically: a run killed mid-write keeps the previous file."""
    cpu = {k: v.cpu() for k, v in state.items()}
    atomic_write(path, lambda f: torch.save(cpu, f))


def fit(name: str, model: nn.Module, stage: StageConfig, loss_at: Callable[[int], Tensor],
        save: Callable[[], None], *, checkpoint_every_s: float, progress: bool = True,
        after_step: Callable[[int], None] | None = None) -> TrainLog:
    """The loop every stage shares: ``loss_at(step)`` builds its batch and returns the scalar loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": stage.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=stage.lr, betas=(0.9, 0.95))
    model.train()
    start = last_save = time.monotonic()
    losses: list[float] = []
    stopped_early = False
    bar = tqdm(range(stage.steps), desc=name, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        time_fraction = (time.monotonic() - start) / (stage.minutes * 60)
        if time_fraction > 1:
            stopped_early = True
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max(step / stage.steps, time_fraction), stage)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, stage.grad_clip)
        opt.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if time.monotonic() - last_save > checkpoint_every_s:
            save()
            last_save = time.monotonic()
    bar.close()
    model.eval()
    save()
    seconds = time.monotonic() - start
    if stopped_early:
        print(f"{name}: wall-clock budget of {stage.minutes} min reached after {len(losses)} of "
              f"{stage.steps} steps", file=sys.stderr)
    return TrainLog(losses, len(losses), seconds, stopped_early)


def train_classifier(cfg: TinyConfig, out: Path, *, hue_random: bool, progress: bool = True) -> TrainLog:
    """Train a ShapeClassifier on fresh batches (hue-randomised ones for the shape-only classifier)."""
    stage = cfg.classifier
    torch.manual_seed(cfg.seed)
    model = ShapeClassifier(stage.model).to(cfg.device)

    def loss_at(step: int) -> Tensor:
        seed = batch_seed(cfg.seed, "classifier", step) + (stage.steps if hue_random else 0)
        labels_B = random_labels(stage.batch_size, seed)
        images_B3HW = make_batch(labels_B, seed, hue_random=hue_random, config=cfg.data)
        return F.cross_entropy(model(images_B3HW.to(cfg.device)), labels_B.to(cfg.device))

    name = "classifier (hue-randomised)" if hue_random else "classifier"
    log = fit(name, model, stage, loss_at, lambda: save_classifier(model, out),
              checkpoint_every_s=cfg.checkpoint_every_s, progress=progress)
    log.metrics["accuracy"] = real_accuracy(model, stage.eval_images, EVAL_SEED_OFFSET + cfg.seed,
                                            hue_random=hue_random, config=cfg.data)
    return log


def to_signed(images_B3HW: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1] (the VAE's image range)."""
    return images_B3HW * 2 - 1


@torch.no_grad()
def residual_candidates(vae: VQVAE, images_B3HW: Tensor) -> Tensor:
    """(N, Cvae) residual vectors the quantizer sees at every scale: the natural points to (re)seed codes at."""
    q = vae.quantize
    f_BChw = vae.quant_conv(vae.encoder(to_signed(images_B3HW)))
    _, f_hats = q.quantize(f_BChw)
    candidates = []
    for k, pn in enumerate(q.patch_nums):
        rest_BChw = f_BChw - (f_hats[k - 1] if k else 0)
        rest_BCpp = F.interpolate(rest_BChw, size=(pn, pn), mode="area")
        candidates.append(rest_BCpp.permute(0, 2, 3, 1).reshape(-1, q.Cvae))
    return torch.cat(candidates)


@torch.no_grad()
def restart_dead_codes(vae: VQVAE, images_B3HW: Tensor, dead_hits: float, generator: torch.Generator) -> int:
    """Move every code whose EMA hits (summed over scales) are below ``dead_hits`` onto a random residual."""
    q = vae.quantize
    dead_V = q.ema_vocab_hit_SV.sum(0) < dead_hits
    n_dead = int(dead_V.sum())
    if n_dead:
        cand_NC = residual_candidates(vae, images_B3HW)
        pick = torch.randint(len(cand_NC), (n_dead,), generator=generator)
        q.embedding.weight[dead_V] = cand_NC[pick.to(cand_NC.device)]
        q.ema_vocab_hit_SV[:, dead_V] = dead_hits  # give the moved codes time to be hit before judging again
    return n_dead


@torch.no_grad()
def psnr(vae: VQVAE, images_B3HW: Tensor, batch_size: int = 250) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the tokenizer's reconstruction through all scales."""
    vae.eval()
    values = []
    for i in range(0, len(images_B3HW), batch_size):
        x_B3HW = images_B3HW[i:i + batch_size].to(vae.quantize.embedding.weight.device)
        recon_B3HW = (vae.idxBl_to_img(vae.img_to_idxBl(to_signed(x_B3HW))) + 1) / 2
        mse_B = (recon_B3HW - x_B3HW).square().flatten(1).mean(1).clamp(min=1e-10)
        values.append(-10 * torch.log10(mse_B))
    return float(torch.cat(values).mean())


def train_vqvae(cfg: TinyConfig, out: Path, *, progress: bool = True) -> tuple[VQVAE, TrainLog]:
    """Train the tokenizer: MSE reconstruction + VQ loss, codebook seeded from residuals, dead codes restarted."""
    stage = cfg.vqvae
    torch.manual_seed(cfg.seed)
    vae = VQVAE(stage.model).to(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)

    def batch(step: int) -> Tensor:
        seed = batch_seed(cfg.seed, "vqvae", step)
        return make_batch(random_labels(stage.batch_size, seed), seed, config=cfg.data).to(cfg.device)

    with torch.no_grad():   # seed the whole codebook from the untrained encoder's residuals
        cand_NC = residual_candidates(vae, batch(-1))
        pick = torch.randint(len(cand_NC), (vae.vocab_size,), generator=g)
        vae.quantize.embedding.weight.copy_(cand_NC[pick.to(cand_NC.device)])

    def loss_at(step: int) -> Tensor:
        x_B3HW = to_signed(batch(step))
        recon_B3HW, vq_loss, _ = vae(x_B3HW)
        return F.mse_loss(recon_B3HW, x_B3HW) + vq_loss

    def after_step(step: int) -> None:
        if (step + 1) % stage.restart_every == 0 and step < stage.restart_until * stage.steps:
            restart_dead_codes(vae, batch(step), stage.dead_hits, g)

    log = fit("vqvae", vae, stage, loss_at, lambda: save_state(vae.state_dict(), out),
              checkpoint_every_s=cfg.checkpoint_every_s, progress=progress, after_step=after_step)
    held_out = make_batch(random_labels(stage.eval_images, EVAL_SEED_OFFSET + cfg.seed),
                          EVAL_SEED_OFFSET + cfg.seed, config=cfg.data)
    log.metrics["psnr_db"] = psnr(vae, held_out)
    B = stage.eval_images
    idx = torch.cat([i.flatten() for i in vae.img_to_idxBl(to_signed(held_out.to(cfg.device)))])
    log.metrics["codes_used_pct"] = 100 * idx.unique().numel() / vae.vocab_size
    log.metrics["eval_images"] = float(B)
    return vae, log


def load_vqvae(path: Path, patch_nums: tuple[int, ...]) -> VQVAE:
    """The tokenizer saved by the vqvae stage (official layout), in eval mode."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    vae = VQVAE(vqvae_config_from_state_dict(sd, patch_nums))
    vae.load_state_dict(sd)
    return vae.eval().requires_grad_(False)


def train_var(cfg: TinyConfig, vae: VQVAE, out: Path, *, progress: bool = True) -> tuple[VAR, TrainLog]:
    """Train the transformer by teacher forcing on freshly tokenised images (cross-entropy over all L tokens)."""
    stage = cfg.var
    if (vae.vocab_size, vae.Cvae, vae.patch_nums) != (stage.model.vocab_size, stage.model.z_channels,
                                                      stage.model.patch_nums):
        raise ValueError("the tokenizer does not fit the VAR config (vocab_size, z_channels, patch_nums)")
    torch.manual_seed(cfg.seed)
    var = VAR(stage.model).to(cfg.device)

    def loss_at(step: int) -> Tensor:
        seed = batch_seed(cfg.seed, "var", step)
        labels_B = random_labels(stage.batch_size, seed)
        images_B3HW = make_batch(labels_B, seed, config=cfg.data).to(cfg.device)
        labels_B = labels_B.to(cfg.device)
        with torch.no_grad():
            idx_per_scale = vae.img_to_idxBl(to_signed(images_B3HW))
            x_BLCv = vae.idxBl_to_var_input(idx_per_scale)
        logits_BLV = var(labels_B, x_BLCv)
        return F.cross_entropy(logits_BLV.flatten(0, 1), torch.cat(idx_per_scale, dim=1).flatten())

    log = fit("var", var, stage, loss_at, lambda: save_state(var.state_dict(), out),
              checkpoint_every_s=cfg.checkpoint_every_s, progress=progress)
    return var, log


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.backbones.tiny",
                                description="Train the embedded tiny backbone and its classifiers.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one stage or all of them")
    t.add_argument("stage", choices=(*STAGES, "all"))
    t.add_argument("--seed", type=int, default=TinyConfig.seed)
    t.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="directory of the weight files")
    t.add_argument("--size", choices=tuple(VAR_SIZES), default="tiny", help="transformer size (stage var)")
    t.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    t.add_argument("--minutes", type=float, default=None, help="override the stage's wall-clock cap")
    t.add_argument("--threads", type=int, default=TinyConfig.threads)
    t.add_argument("--device", default=TinyConfig.device, help="cpu (the reference recipe) or cuda")
    t.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = TinyConfig(seed=args.seed, threads=args.threads, device=args.device)
    cfg.var = dataclasses.replace(cfg.var, model=tiny_var_config(args.size))
    var_file = VAR_SIZES[args.size][3].name
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        print("error: --steps must be >= 1 and --minutes > 0", file=sys.stderr)
        return 2
    stages = STAGES if args.stage == "all" else (args.stage,)
    for name in stages:
        stage_cfg = getattr(cfg, name)
        overrides = {k: v for k, v in (("steps", args.steps), ("minutes", args.minutes)) if v is not None}
        setattr(cfg, name, dataclasses.replace(stage_cfg, **overrides))
    torch.set_num_threads(cfg.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    for name in stages:
        if name == "classifier":
            for hue_random, fname in ((False, "tiny_classifier.pt"), (True, "tiny_classifier_shape.pt")):
                log = train_classifier(cfg, args.out / fname, hue_random=hue_random, progress=progress)
                print(f"{fname}: {log.steps_done} steps in {log.seconds:.0f} s, "
                      f"accuracy on fresh images {log.metrics['accuracy']:.4f}")
        elif name == "vqvae":
            _, log = train_vqvae(cfg, args.out / TINY_VAE.name, progress=progress)
            print(f"{TINY_VAE.name}: {log.steps_done} steps in {log.seconds:.0f} s, "
                  f"PSNR {log.metrics['psnr_db']:.2f} dB, codes used {log.metrics['codes_used_pct']:.1f} %")
        elif name == "var":
            vae = load_vqvae(args.out / TINY_VAE.name, cfg.var.model.patch_nums).to(cfg.device)
            _, log = train_var(cfg, vae, args.out / var_file, progress=progress)
            print(f"{var_file}: {log.steps_done} steps in {log.seconds:.0f} s, "
                  f"final loss (mean of the last 50 steps) {sum(log.losses[-50:]) / len(log.losses[-50:]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
