"""A micro backbone for the sweep's tests: real model code (random VQVAE + VAR in the official layout) and a random
FID feature extractor (a small ShapeClassifier), tiny enough that a whole sweep runs in seconds of compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import torch

from pipeline.backbones.var import VARConfig, random_var
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.data.classifier import ClassifierConfig, ShapeClassifier, save_classifier
from tuners.studies import RECORD, record_of, study_name

SWITTI_TOKENIZER = Path(__file__).parent / "data" / "switti" / "text_encoder"  # a CLIP tokenizer (for tiny_clip)
PATCH_NUMS = (1, 2, 4)
FEATURE_DIM = 16  # FID needs more images than this
SMALL_TRIALS = 6  # proxy trials after the SMALL_DESIGN design points
SMALL_DESIGN = 2
SMALL_STUDIES = ("proxy", "screen", "refine/cfg-0", "confirm")  # the Optuna studies of a SMALL_SWEEP
SMALL_SWEEP = [  # a whole CFG sweep in seconds of compute: 2 + 6 proxy trials of 8 images, 4 screened points of 24
    # images (and the proxy's pick), 4 FID trials of 24 images in one region, a race at 48 then 72
    "guidance=cfg", f"search.n_trials={SMALL_TRIALS}", "search.n_startup_trials=3", "search.max_grows=0",
    "proxy.num_images=8", "proxy.batch_size=8", "proxy.design=[0.5,1]", "screen.points=4", "screen.rungs=[24]",
    "screen.regions=1", "refine.n_trials=4", "refine.num_images=24",
    "confirm.finalists=2", "confirm.rungs=[48,72]", "confirm.bootstrap=20", "confirm.reference_num_images=40",
    "confirm.batch_size=24", "sweep.grid_images=4", "sweep.grid_nrow=2", "sweep.heatmap_images=2",
]


def write_micro_backbone(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write vae.pt, var.pt (load_var format, 16x16 images, 4 classes) and cls.pt (extractor weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    vae = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=PATCH_NUMS,
                      using_sa=False, using_mid_sa=False)
    var = VARConfig(vocab_size=32, z_channels=8, depth=1, embed_dim=32, num_heads=2, num_classes=4,
                    patch_nums=PATCH_NUMS)
    paths = {"vae": folder / "vae.pt", "var": folder / "var.pt", "cls": folder / "cls.pt"}
    random_var(vae, var, seed=seed).save(paths["vae"], paths["var"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        save_classifier(ShapeClassifier(ClassifierConfig(width=8, feature_dim=FEATURE_DIM)), paths["cls"])
    return paths


def micro_overrides(paths: dict[str, Path], root: Path) -> list[str]:
    """Hydra overrides that point a sweep at the micro backbone, with every store under `root`."""
    return [
        f"root={root}",
        f"backbone.vae_ckpt={paths['vae']}",
        f"backbone.var_ckpt={paths['var']}",
        f"backbone.patch_nums=[{','.join(map(str, PATCH_NUMS))}]",
        f"confirm.extractor_weights={paths['cls']}",
    ]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    """A CSV in the format of Switti's eval_prompts (index, id, captions)."""
    import csv

    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["", "id", "captions"])
        rows.writerows([i, i, p] for i, p in enumerate(prompts))
    return path


def tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (vision + text, width 32) with the Switti fixtures' tokenizer and a 16 px image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SWITTI_TOKENIZER, local_files_only=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def t2i_sweep_overrides(root: Path) -> list[str]:
    """The text-to-image metrics of a small sweep on random weights (the numbers mean nothing), files under `root`:
    FID at 16 px with the micro sweep's random extractor against a unit-Gaussian reference, the CLIP score of a tiny
    random CLIP, one worker, and the SMALL_SWEEP stages."""
    cls = write_micro_backbone(root / "micro")["cls"]
    np.savez(root / "ref.npz", mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    return ["backbone.fid_extractor=guidetune-tiny", f"confirm.extractor_weights={cls}",
            f"confirm.reference={root / 'ref.npz'}", "confirm.metrics=[fid]", "launcher.workers=1",
            f"confirm.clip_weights={tiny_clip(root / 'clip')}", "backbone.fid_image_size=16", *SMALL_SWEEP]


LEDGERS = ("screen", "confirm")  # studies whose trials are fixed jobs (user attr ``job``), not searched parameters


def study_trials(storage: str, name: str, stages: tuple[str, ...]) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """The trials of a sweep's studies by stage; a study not created yet (a refinement region is opened after the
    screen) has none."""
    existing = set(optuna.get_all_study_names(storage))
    return {stage: optuna.load_study(study_name=study_name(name, stage), storage=storage).trials
            if study_name(name, stage) in existing else [] for stage in stages}


def ran(stage: str, trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial was run by its own stage, not told to it: a refinement region's first trials are the screen's
    points around its basin (their record says screen, and their MLflow run is the screen's)."""
    return not (stage.startswith("refine/") and RECORD in trial.user_attrs and record_of(trial).stage == "screen")
