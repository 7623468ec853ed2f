"""A small CNN that recognises the procedural shapes; its penultimate layer is the embedded FID feature space.

Two shipped instances: ``tiny_classifier.pt`` (trained on the images as generated: the FID / IS extractor
and the accuracy judge of the embedded backbone) and ``tiny_classifier_shape.pt`` (trained on hue-randomised
images, so it can only read the shape).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.data.files import atomic_write, load_weights
from pipeline.data.shapes import NUM_CLASSES, ShapesConfig, make_batch

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "backbones" / "weights"
SHIPPED_CLASSIFIER = WEIGHTS_DIR / "tiny_classifier.pt"
SHIPPED_SHAPE_CLASSIFIER = WEIGHTS_DIR / "tiny_classifier_shape.pt"


@dataclass
class ClassifierConfig:
    width: int = 16          # channels of the first stage; doubled at each of the three stages
    feature_dim: int = 128   # F, the penultimate (feature) width
    num_classes: int = NUM_CLASSES


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ShapeClassifier(nn.Module):
    """Three conv stages (each halves the resolution), global average pool, a feature layer, a linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(_stage(3, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))
        self.feature = nn.Sequential(nn.Linear(4 * w, config.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x_B3HW: Tensor) -> Tensor:
        """x_B3HW: float in [0, 1] -> (B, F) penultimate features."""
        h_BCHW = self.body((x_B3HW - 0.5) / 0.25)
        return self.feature(h_BCHW.mean(dim=(2, 3)))

    def forward(self, x_B3HW: Tensor) -> Tensor:
        """x_B3HW: float in [0, 1] -> (B, C) logits."""
        return self.head(self.features(x_B3HW))


def save_classifier(model: ShapeClassifier, path: str | Path) -> None:
    """Write ``{"config": ..., "state_dict": ...}`` (loadable with ``weights_only=True``)."""
    blob = {"config": asdict(model.config), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    atomic_write(path, lambda f: torch.save(blob, f))


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapeClassifier:
    """Load a classifier saved by ``save_classifier`` (default: the shipped one), in eval mode."""
    path = Path(path) if path is not None else SHIPPED_CLASSIFIER
    blob = load_weights(path, what="classifier weights", fix="train them with `python -m pipeline.backbones.tiny "
                        "train classifier` or pass a file written by save_classifier")
    if not isinstance(blob, dict) or set(blob) != {"config", "state_dict"}:
        raise ValueError(f"{path} is not a classifier checkpoint (expected keys config, state_dict); "
                         "save it with pipeline.data.classifier.save_classifier")
    model = ShapeClassifier(ClassifierConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def accuracy(model: ShapeClassifier, images_B3HW: Tensor, labels_B: Tensor, batch_size: int = 500) -> float:
    """Fraction of images whose arg-max class equals their label."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(labels_B), batch_size):
        logits_BC = model(images_B3HW[i:i + batch_size].to(device))
        hits += int((logits_BC.argmax(dim=1).cpu() == labels_B[i:i + batch_size]).sum())
    return hits / max(len(labels_B), 1)


def real_accuracy(model: ShapeClassifier, n: int, seed: int, *, hue_random: bool = False,
                  config: ShapesConfig | None = None) -> float:
    """Accuracy on ``n`` fresh generated images (balanced labels), seeded."""
    labels_B = torch.arange(n) % NUM_CLASSES
    return accuracy(model, make_batch(labels_B, seed, hue_random=hue_random, config=config), labels_B)
