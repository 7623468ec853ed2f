"""FID stage: torch-fidelity metrics in memory, reference statistics and their cache, ADM-evaluator .npz files.

The extractor is the real ``guidetune-tiny`` wrapper around a small ShapeClassifier built here (random weights with
batch-norm statistics calibrated on the shapes data, so features are O(1)); no Inception weights, no network.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity import calculate_metrics
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torchvision.utils import save_image

from pipeline.data.classifier import ClassifierConfig, ShapeClassifier, save_classifier
from pipeline.data.shapes import make_batch, random_labels
from pipeline.fid.fidelity import (
    SHORT_NAMES,
    TINY_EXTRACTOR,
    BatchSource,
    FidEvaluator,
    MetricOptions,
    NpzWriter,
    iter_npz_images,
    load_npz,
    npz_image_shape,
    reference_source,
    save_npz,
    shapes_source,
    to_uint8,
)

FEATURE_DIM = 16
OPTIONS = MetricOptions(kid_subsets=20, kid_subset_size=40)
ALL = ("fid", "isc", "kid", "prc")


def shapes(n: int, seed: int) -> torch.Tensor:
    return make_batch(random_labels(n, seed), seed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = ShapeClassifier(ClassifierConfig(width=8, feature_dim=FEATURE_DIM))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the running stats become those of the batch below
    model.train()
    with torch.no_grad():
        model(shapes(256, seed=99))
        model.head.weight.mul_(20.0)  # confident logits, so the Inception Score moves away from 1
    path = tmp_path_factory.mktemp("extractor") / "classifier.pt"
    save_classifier(model.eval(), path)
    return path


def evaluator(weights, metrics=("fid",), cache_dir=None, batch_size=32) -> FidEvaluator:
    return FidEvaluator(TINY_EXTRACTOR, metrics=metrics, weights_path=weights, batch_size=batch_size,
                        cache_dir=cache_dir, options=OPTIONS, progress=False)


def write_pngs(folder, images_B3HW):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images_B3HW):
        save_image(image, folder / f"{i:05d}.png")
    return folder


# ------------------------------------------------------------------------------------------ quantisation


def test_to_uint8_equals_png_pixels(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 9, 11, generator=g) * 1.2 - 0.1  # out-of-range values are clamped
    x[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # rounding boundaries
    q = to_uint8(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    for i in range(3):
        save_image(x[i], tmp_path / f"{i}.png")
        png_HW3 = np.asarray(Image.open(tmp_path / f"{i}.png").convert("RGB"))
        np.testing.assert_array_equal(q[i].permute(1, 2, 0).numpy(), png_HW3)
    assert to_uint8(q) is q


@pytest.mark.parametrize(("bad", "match"), [
    (torch.rand(2, 4, 4), r"\(B, 3, H, W\)"),
    (torch.rand(2, 1, 4, 4), r"\(B, 3, H, W\)"),
    (torch.full((1, 3, 2, 2), float("nan")), "NaN"),
    (torch.ones(1, 3, 2, 2, dtype=torch.int64), "float in \\[0, 1\\] or uint8"),
])
def test_to_uint8_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        to_uint8(bad)


# ------------------------------------------------------------------------------------------------ metrics


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(weights):
    ev = evaluator(weights)
    real = shapes(96, seed=1)
    ref = ev.reference(BatchSource("real-96-seed1", lambda: real.split(40)))
    assert abs(ev.score(real.split(50), ref)["fid"]) < 1e-6
    fids = [ev.score([(real + shift).clamp(0, 1)], ref)["fid"] for shift in (0.03, 0.1, 0.2, 0.35)]
    assert fids[0] > 1e-3
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


def test_in_memory_metrics_equal_calculate_metrics_on_saved_pngs(weights, tmp_path):
    generated = (shapes(80, seed=3) * 0.9 + 0.05).clamp(0, 1)  # a different distribution from the reference
    real = shapes(72, seed=4)
    ev = evaluator(weights, metrics=ALL)
    ours = ev.score(generated.split(30), ev.reference(BatchSource("real-72-seed4", lambda: real.split(30))))
    theirs = calculate_metrics(
        input1=str(write_pngs(tmp_path / "generated", generated)), input2=str(write_pngs(tmp_path / "real", real)),
        fid=True, isc=True, kid=True, prc=True, feature_extractor=TINY_EXTRACTOR,
        feature_extractor_weights_path=str(weights), cuda=False, cache=False, verbose=False, save_cpu_ram=True,
        batch_size=32, kid_subsets=OPTIONS.kid_subsets, kid_subset_size=OPTIONS.kid_subset_size,
    )
    assert set(ours) == {SHORT_NAMES[key] for key in theirs}
    assert ours["fid"] > 0.01 and ours["isc"] > 1.05
    for key, value in theirs.items():
        assert ours[SHORT_NAMES[key]] == pytest.approx(value, abs=1e-3, rel=1e-5), key


def test_reference_sources_agree_and_match_torch_fidelity_statistics(weights, tmp_path):
    real = shapes(40, seed=5)
    ev = evaluator(weights, metrics=("fid", "prc"))
    save_npz(tmp_path / "real.npz", to_uint8(real).permute(0, 2, 3, 1))
    refs = [ev.reference(BatchSource("real-40-seed5", lambda: real.split(16))),
            ev.reference(write_pngs(tmp_path / "png", real)),
            ev.reference(tmp_path / "real.npz")]
    for ref in refs[1:]:
        torch.testing.assert_close(ref.features, refs[0].features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref.mu, refs[0].mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ref.sigma, refs[0].sigma, rtol=1e-4, atol=1e-8)
    assert [ref.num_images for ref in refs] == [40, 40, 40]
    assert len({ref.key for ref in refs}) == 3
    features = refs[0].features.double().numpy()
    np.testing.assert_allclose(refs[0].mu, features.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(refs[0].sigma, np.cov(features, rowvar=False), rtol=1e-6, atol=1e-9)


def test_adm_reference_statistics_are_used_as_given(weights, tmp_path):
    rng = np.random.default_rng(0)
    a_FF = rng.normal(size=(FEATURE_DIM, FEATURE_DIM))
    mu, sigma = rng.normal(size=FEATURE_DIM), a_FF @ a_FF.T / FEATURE_DIM
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    ev = evaluator(weights)
    ref = ev.reference(tmp_path / "stats.npz")
    assert ref.features is None and ref.num_images is None
    np.testing.assert_array_equal(ref.mu, mu)
    generated = shapes(48, seed=6)
    features_NF = ev.features([generated])[ev.feature_layer].double().numpy()
    expected = fid_statistics_to_metric({"mu": features_NF.mean(0), "sigma": np.cov(features_NF, rowvar=False)},
                                        {"mu": mu, "sigma": sigma}, verbose=False)[KEY_METRIC_FID]
    assert ev.score([generated], ref)["fid"] == pytest.approx(expected, rel=1e-6)

    images = to_uint8(shapes(24, seed=7)).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "both.npz", arr_0=images, mu=mu, sigma=sigma)
    both = evaluator(weights, metrics=("fid", "kid")).reference(tmp_path / "both.npz")
    np.testing.assert_array_equal(both.sigma, sigma)  # FID keeps the file's statistics ...
    assert both.features.shape == (24, FEATURE_DIM)  # ... KID/PRC use the file's images


def test_reference_source_maps_the_config_value(tmp_path):
    embedded = reference_source("shapes", num_images=24, seed=3, batch_size=8)
    assert isinstance(embedded, BatchSource) and embedded.num_batches == 3
    assert embedded.key == shapes_source(24, seed=3, batch_size=8).key != shapes_source(24, 4, 8).key
    images = torch.cat(list(embedded.batches()))
    assert images.shape == (24, 3, 32, 32) and torch.equal(images, torch.cat(list(embedded.batches())))
    assert reference_source(str(tmp_path / "ref.npz"), num_images=24, seed=3, batch_size=8) == tmp_path / "ref.npz"


def test_reference_is_picklable_for_ray(weights):
    ev = evaluator(weights, metrics=("fid", "kid"))
    ref = ev.reference(shapes_source(24, seed=0, batch_size=8))
    clone = pickle.loads(pickle.dumps(ref))
    np.testing.assert_array_equal(clone.sigma, ref.sigma)
    assert torch.equal(clone.features, ref.features) and clone.key == ref.key


# -------------------------------------------------------------------------------------------------- cache


def test_reference_cache_is_reused_when_unchanged_and_rebuilt_when_data_changes(weights, tmp_path):
    cache = tmp_path / "cache"
    folder = write_pngs(tmp_path / "real", shapes(20, seed=8))
    first = evaluator(weights, cache_dir=cache).reference(folder)
    assert not first.from_cache and (cache / f"{first.key}.pt").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [f"{first.key}.pt"]  # no temp files left behind

    again = evaluator(weights, cache_dir=cache).reference(folder)
    assert again.from_cache and again.key == first.key
    np.testing.assert_array_equal(again.mu, first.mu)
    assert torch.equal(again.features, first.features)

    changed = folder / "00003.png"
    save_image(shapes(1, seed=9)[0], changed)
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = evaluator(weights, cache_dir=cache).reference(folder)
    assert not rebuilt.from_cache and rebuilt.key != first.key
    assert not np.allclose(rebuilt.mu, first.mu)

    source = shapes_source(16, seed=0, batch_size=8)
    assert not evaluator(weights, cache_dir=cache).reference(source).from_cache
    assert evaluator(weights, cache_dir=cache).reference(source).from_cache
    assert not evaluator(weights, cache_dir=cache).reference(shapes_source(16, seed=1, batch_size=8)).from_cache

    npz = tmp_path / "real.npz"
    save_npz(npz, to_uint8(shapes(20, seed=10)).permute(0, 2, 3, 1))
    assert not evaluator(weights, cache_dir=cache).reference(npz).from_cache
    assert evaluator(weights, cache_dir=cache).reference(npz).from_cache
    save_npz(npz, to_uint8(shapes(20, seed=11)).permute(0, 2, 3, 1))
    assert not evaluator(weights, cache_dir=cache).reference(npz).from_cache

    assert not evaluator(weights).reference(folder).from_cache  # no cache_dir: always computed

    (cache / f"{rebuilt.key}.pt").write_bytes(b"not a torch file")  # a damaged entry is rebuilt, not fatal
    repaired = evaluator(weights, cache_dir=cache).reference(folder)
    assert not repaired.from_cache and np.array_equal(repaired.mu, rebuilt.mu)
    assert evaluator(weights, cache_dir=cache).reference(folder).from_cache


def test_cache_key_follows_the_extractor_weights(weights, tmp_path):
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_classifier(ShapeClassifier(ClassifierConfig(width=8, feature_dim=FEATURE_DIM)).eval(), other)
    cache, source = tmp_path / "cache", shapes_source(16, seed=0, batch_size=8)
    key = evaluator(weights, cache_dir=cache).reference(source).key
    ref = evaluator(other, cache_dir=cache).reference(source)
    assert not ref.from_cache and ref.key != key


def test_images_are_resized_before_the_extractor_as_switti_evaluates(weights, tmp_path):
    """image_size: shorter side to it with PIL's Lanczos, the centre square kept (torchvision's Resize + CenterCrop on
    PIL images, as Switti's utils/fid_score_in_memory.py); the reference cache keeps the two apart."""
    images = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(4))
    ev = FidEvaluator(TINY_EXTRACTOR, weights_path=weights, progress=False, image_size=16)
    by_hand = []
    for x in to_uint8(images):
        pil = Image.fromarray(x.permute(1, 2, 0).numpy())
        w, h = pil.size
        pil = pil.resize((int(16 * w / h), 16), Image.Resampling.LANCZOS)  # the shorter side (h) to 16
        left = round((pil.size[0] - 16) / 2)  # torchvision's centre
        by_hand.append(torch.from_numpy(np.array(pil.crop((left, 0, left + 16, 16)))).permute(2, 0, 1))
    plain = evaluator(weights).features([torch.stack(by_hand)])["features"]
    assert torch.equal(ev.features([images])["features"], plain)
    assert not torch.equal(evaluator(weights).features([images])["features"][:, :4], plain[:, :4])
    assert ev.extractor_key != evaluator(weights).extractor_key
    with pytest.raises(ValueError, match="image_size"):
        FidEvaluator(TINY_EXTRACTOR, weights_path=weights, progress=False, image_size=0)


# ---------------------------------------------------------------------------------------------- npz files


def test_npz_export_round_trips(tmp_path):
    images = torch.randint(0, 256, (7, 5, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "samples.npz"
    save_npz(path, images)
    with np.load(path) as npz:
        assert npz.files == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 5, 6, 3)
    np.testing.assert_array_equal(arr, images.numpy())
    np.testing.assert_array_equal(load_npz(path), images.numpy())
    assert npz_image_shape(path) == (7, 5, 6, 3)
    batches = list(iter_npz_images(path, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), images.permute(0, 3, 1, 2))


def test_npz_writer_streams_float_batches(tmp_path):
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "stream.npz"
    with NpzWriter(path, num_images=5, height=4, width=4) as npz:
        npz.add(x[:2])
        npz.add(x[2:])
    np.testing.assert_array_equal(load_npz(path), to_uint8(x).permute(0, 2, 3, 1).numpy())


def test_npz_writer_refuses_incomplete_or_mismatched_sets(tmp_path):
    path = tmp_path / "partial.npz"
    with pytest.raises(ValueError, match="2 of 3 images"), NpzWriter(path, 3, 4, 4) as npz:
        npz.add(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="too many"), NpzWriter(path, 3, 4, 4) as npz:
        npz.add(torch.rand(4, 3, 4, 4))
    with pytest.raises(ValueError, match="same size"), NpzWriter(path, 3, 4, 4) as npz:
        npz.add(torch.rand(3, 3, 5, 4))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        save_npz(path, np.zeros((2, 4, 4, 3), dtype=np.float32))


# ------------------------------------------------------------------------------------------------- errors


def test_reference_file_without_mu_sigma_is_refused(weights, tmp_path):
    np.savez(tmp_path / "labels.npz", labels=np.arange(4))
    with pytest.raises(ValueError, match="no mu/sigma"):
        evaluator(weights).reference(tmp_path / "labels.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(FEATURE_DIM))
    with pytest.raises(ValueError, match="has mu but not sigma"):
        evaluator(weights).reference(tmp_path / "half.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    with pytest.raises(ValueError, match="kid/prc need"):
        evaluator(weights, metrics=("fid", "prc")).reference(tmp_path / "stats.npz")


def test_unreadable_npz_files_are_named(weights, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    np.save(tmp_path / "array.npy", np.zeros(3))
    good = tmp_path / "good.npz"
    save_npz(good, np.zeros((4, 8, 8, 3), np.uint8))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:-200])           # truncated download
    for read in (load_npz, npz_image_shape, lambda p: next(iter_npz_images(p, 2)), evaluator(weights).reference):
        for path in (tmp_path / "junk.npz", tmp_path / "missing.npz", cut):
            with pytest.raises(ValueError, match=re.escape(str(path))):
                read(path)
    with pytest.raises(ValueError, match=r"array\.npy holds one \.npy array"):
        load_npz(tmp_path / "array.npy")


def test_mismatched_feature_dimensions_are_refused(weights, tmp_path):
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    ev = evaluator(weights)
    with pytest.raises(ValueError, match=f"feature dimensions differ: {TINY_EXTRACTOR} gives {FEATURE_DIM}"):
        ev.score([shapes(32, seed=0)], ev.reference(tmp_path / "inception.npz"))


def test_fewer_images_than_the_feature_dimension_is_refused(weights):
    ev = evaluator(weights)
    ref = ev.reference(BatchSource("real-32", lambda: [shapes(32, seed=0)]))
    with pytest.raises(ValueError, match=f"more generated images than the feature dimension \\(12 <= {FEATURE_DIM}"):
        ev.score([shapes(12, seed=1)], ref)
    small = ev.reference(BatchSource("real-10", lambda: [shapes(10, seed=2)]))
    with pytest.raises(ValueError, match="more reference images"):
        ev.score([shapes(32, seed=1)], small)


def test_bad_arguments_give_one_clear_error(weights, tmp_path):
    with pytest.raises(ValueError, match="choose a non-empty subset"):
        evaluator(weights, metrics=("fid", "sfid"))
    with pytest.raises(ValueError, match="is not registered"):
        FidEvaluator("no-such-net", progress=False)
    with pytest.raises(ValueError, match="not found"):
        evaluator(tmp_path / "missing.pt")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weights": OPTIONS}, unsafe)  # a pickled object: not loadable with weights_only=True
    with pytest.raises(ValueError, match="weights_only=True"):
        FidEvaluator("inception-v3-compat", weights_path=unsafe, progress=False)
    ev = evaluator(weights)
    with pytest.raises(ValueError, match="iterable was empty"):
        ev.score([], None)
    with pytest.raises(ValueError, match="need a reference"):
        ev.score([shapes(20, seed=0)], None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        ev.reference(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"neither an \.npz file nor a folder"):
        ev.reference(tmp_path / "nowhere")


def test_inception_score_alone_needs_no_reference(weights):
    out = evaluator(weights, metrics=("isc",)).score([shapes(40, seed=0)], None)
    assert set(out) == {"isc", "isc_std"} and out["isc"] >= 1.0
