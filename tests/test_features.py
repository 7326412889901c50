"""The feature cache: keyed by everything that determines a feature, reused for unchanged
images, recomputed for edited or added ones, and never built when not needed."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_image

from transferkit.bases import get_base
from transferkit.commands.extract import extract
from transferkit.config import DataConfig, ExtractConfig
from transferkit.feature_files import load_features
from transferkit.features import FeatureSpec, weights_fingerprint

SPEC = FeatureSpec("vgg16", "abc", 32, 5, "avg", {"channel_order": "bgr"}, "float32")


@pytest.mark.parametrize("change", [
    {"base": "resnet50"}, {"weights": "abd"}, {"image_size": 48}, {"blocks": 4},
    {"pooling": "max"}, {"preprocessing": {"channel_order": "rgb"}}, {"precision": "mixed"}])
def test_cache_key_changes_with_each_part(change):
    assert dataclasses.replace(SPEC, **change).key() != SPEC.key()


def test_cache_key_is_stable():
    same = FeatureSpec("vgg16", "abc", 32, 5, "avg", {"channel_order": "bgr"}, "float32")
    assert same.key() == SPEC.key()


def test_weights_fingerprint_follows_file_content(tmp_path: Path):
    from transferkit.bases import build_base

    spec = get_base("vgg16")
    path = tmp_path / "w.weights.h5"
    build_base(spec, 32, "none").save_weights(path)
    first = weights_fingerprint(spec, str(path), seed=0)
    assert first == weights_fingerprint(spec, str(path), seed=1)  # seed only matters for none
    assert weights_fingerprint(spec, "none", 0) != weights_fingerprint(spec, "none", 1)


def _extract(data: Path, out: Path, **kwargs) -> SimpleNamespace:
    """extract's counts, and the features it wrote, read back."""
    config = ExtractConfig(data=DataConfig(data_dir=data, image_size=32, batch_size=8), output=out,
                           base="vgg16", weights="none", blocks=2, overwrite=True, **kwargs)
    result = extract(config)
    return SimpleNamespace(computed=result.computed, reused=result.reused,
                           features=load_features(out))


def test_second_extract_computes_nothing_and_edits_recompute_only_themselves(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path / "home"))  # no other test's features
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    first = _extract(data, tmp_path / "a.npz")
    assert (first.computed, first.reused) == (18, 0)

    from transferkit.features import FeatureModel

    def must_not_build(*args, **kwargs):
        raise AssertionError("the base was built although every feature was cached")

    with monkeypatch.context() as m:
        m.setattr(FeatureModel, "build", must_not_build)
        second = _extract(data, tmp_path / "b.npz")
    assert (second.computed, second.reused) == (0, 18)
    np.testing.assert_allclose(second.features.features, first.features.features, rtol=1e-6)

    make_image("stripes", 999).save(data / "circles" / "circles_1.png")  # edit one file
    make_image("squares", 998).save(data / "squares" / "new.png")  # add one file
    third = _extract(data, tmp_path / "c.npz")
    assert (third.computed, third.reused) == (2, 17)
    unchanged = [i for i, p in enumerate(third.features.paths)
                 if p not in ("circles/circles_1.png", "squares/new.png")]
    before = dict(zip(first.features.paths, first.features.features, strict=True))
    for i in unchanged:
        np.testing.assert_allclose(third.features.features[i],
                                   before[third.features.paths[i]], rtol=1e-6)

    fresh = _extract(data, tmp_path / "d.npz", cache=False)
    assert (fresh.computed, fresh.reused) == (19, 0)


def test_mixed_precision_extract_gives_float32_features_cached_apart(image_folder: Path,
                                                                     tmp_path: Path):
    full = _extract(image_folder, tmp_path / "f32.npz", precision="float32")
    mixed = _extract(image_folder, tmp_path / "f16.npz", precision="mixed")
    assert (mixed.computed, mixed.reused) == (18, 0)  # float32 features are not reused
    assert mixed.features.meta["precision"] == "mixed"
    assert mixed.features.features.dtype == np.float32
    np.testing.assert_allclose(mixed.features.features, full.features.features,
                               rtol=0.05, atol=0.05 * np.abs(full.features.features).max())


def test_identical_files_go_through_the_base_once(image_folder: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    shutil.copy(data / "circles" / "circles_1.png", data / "circles" / "copy.png")
    result = _extract(data, tmp_path / "dup.npz", cache=False)
    assert (result.computed, result.reused) == (18, 1)
    rows = dict(zip(result.features.paths, result.features.features, strict=True))
    np.testing.assert_array_equal(rows["circles/copy.png"], rows["circles/circles_1.png"])
