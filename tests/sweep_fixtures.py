"""A micro backbone for the sweep's tests: real model code (random VQVAE + VAR in the official layout) and a random
FID feature extractor (a small ShapeClassifier), tiny enough that a whole sweep runs in seconds of compute."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

from pipeline.backbones.var import VARConfig, random_var
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.data.classifier import ClassifierConfig, ShapeClassifier, save_classifier
from tuners.studies import RECORD, record_of, study_name

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
