"""Procedural shapes and the shipped shape classifiers."""

import argparse

import pytest
import torch

from pipeline.data.classifier import (
    SHIPPED_CLASSIFIER,
    SHIPPED_SHAPE_CLASSIFIER,
    ClassifierConfig,
    ShapeClassifier,
    accuracy,
    load_classifier,
    real_accuracy,
    save_classifier,
)
from pipeline.data.shapes import (
    NUM_CLASSES,
    hsv_to_rgb,
    iter_batches,
    make_batch,
    random_labels,
)

TEST_SEED = 987_654_321   # far from every training batch seed of pipeline.backbones.tiny


def test_batch_shape_range_and_determinism():
    labels = torch.arange(NUM_CLASSES).repeat(2)
    a, b = make_batch(labels, 7), make_batch(labels, 7)
    assert a.shape == (2 * NUM_CLASSES, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, make_batch(labels, 8))


def test_image_depends_only_on_seed_position_and_own_label():
    a = make_batch(torch.tensor([0, 5, 3]), 11)
    b = make_batch(torch.tensor([6, 2, 3]), 11)
    assert torch.equal(a[2], b[2])
    assert not torch.equal(a[0], b[0])


def _border(x_B3HW: torch.Tensor) -> torch.Tensor:
    return torch.cat([x_B3HW[..., 0, :], x_B3HW[..., -1, :], x_B3HW[..., :, 0], x_B3HW[..., :, -1]], dim=-1)


def test_class_changes_the_object_not_the_background():
    """Same seed, different class: the border (outside every object) is identical, the image is not."""
    a = make_batch(torch.zeros(16, dtype=torch.int64), 3)
    for c in range(1, NUM_CLASSES):
        b = make_batch(torch.full((16,), c), 3)
        assert not torch.equal(a, b)
        assert torch.equal(_border(a), _border(b))


def test_pairs_share_a_hue_family():
    """Classes 2j and 2j+1 get the same object colour for the same seed: colour cannot separate them."""
    a = make_batch(torch.tensor([0, 2, 4, 6]), 5)
    b = make_batch(torch.tensor([1, 3, 5, 7]), 5)
    # Same seed: same object colour (drawn from the pair's family), same background; the brightest pixels match.
    assert torch.allclose(a.amax(dim=(2, 3)), b.amax(dim=(2, 3)), atol=0.1)


def test_hue_random_keeps_everything_but_the_object_hue():
    labels = torch.arange(NUM_CLASSES)
    a, b = make_batch(labels, 2), make_batch(labels, 2, hue_random=True)
    assert torch.equal(_border(a), _border(b))
    assert not torch.equal(a, b)


def test_hsv_to_rgb_primaries():
    h = torch.tensor([0.0, 1 / 3, 2 / 3])
    rgb = hsv_to_rgb(h, torch.ones(3), torch.ones(3))
    assert torch.allclose(rgb, torch.eye(3), atol=1e-6)


def test_bad_labels_and_batch_arguments():
    with pytest.raises(ValueError, match="labels must lie"):
        make_batch(torch.tensor([NUM_CLASSES]), 0)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(4, 0, 0))


def test_iter_batches_balanced_and_deterministic():
    batches = list(iter_batches(20, 3, 8))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, torch.arange(20) % NUM_CLASSES)
    again = list(iter_batches(20, 3, 8))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches, again, strict=True))


def test_random_labels_seeded_and_in_range():
    a = random_labels(100, 1)
    assert torch.equal(a, random_labels(100, 1)) and int(a.min()) >= 0 and int(a.max()) < NUM_CLASSES


def test_classifier_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ShapeClassifier(ClassifierConfig(width=8, feature_dim=16)).eval()
    save_classifier(model, tmp_path / "c.pt")
    loaded = load_classifier(tmp_path / "c.pt")
    x = make_batch(torch.arange(4), 0)
    assert loaded.features(x).shape == (4, 16) and model(x).shape == (4, NUM_CLASSES)
    assert torch.equal(loaded(x), model(x))


def test_load_classifier_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "sd.pt")
    torch.save(argparse.Namespace(weight=torch.zeros(2)), tmp_path / "obj.pt")    # needs arbitrary unpickling
    with pytest.raises(ValueError, match=r"obj\.pt: torch\.load\(weights_only=True\) refused it .*train them"):
        load_classifier(tmp_path / "obj.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: torch\.load\(weights_only=True\) refused it"):
        load_classifier(tmp_path / "junk.pt")


def test_accuracy_counts_hits():
    model = ShapeClassifier(ClassifierConfig(width=8, feature_dim=16)).eval()
    x = make_batch(torch.arange(8), 0)
    predicted = model(x).argmax(1)
    assert accuracy(model, x, predicted, batch_size=3) == 1.0
    assert accuracy(model, x, (predicted + 1) % NUM_CLASSES) == 0.0


@pytest.mark.skipif(not SHIPPED_CLASSIFIER.is_file(), reason="shipped classifier not trained yet")
def test_shipped_classifier_recognises_fresh_images():
    assert real_accuracy(load_classifier(), 800, TEST_SEED) >= 0.95


@pytest.mark.skipif(not SHIPPED_SHAPE_CLASSIFIER.is_file(), reason="shape-only classifier not trained yet")
def test_shipped_shape_classifier_reads_shape_not_colour():
    model = load_classifier(SHIPPED_SHAPE_CLASSIFIER)
    assert real_accuracy(model, 800, TEST_SEED, hue_random=True) >= 0.9
    assert real_accuracy(model, 800, TEST_SEED + 1) >= 0.9
