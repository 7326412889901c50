"""The probe variant the data checks pick: an earlier block's features for data unlike the
pretraining, the image upsampled inside the model otherwise; its saved model computes the
features it was fitted on, and the run judges it like every candidate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import Recorder, write_class_folder

from transferkit.bases import get_base
from transferkit.commands import finetune as recipe
from transferkit.config import DataConfig, FinetuneConfig
from transferkit.data.folders import load_splits
from transferkit.data.pipeline import build_dataset
from transferkit.features import FeatureModel, FeatureSpec
from transferkit.reporting import NullReporter
from transferkit.runs.records import Adaptation
from transferkit.training.candidates.variants import (
    EARLIER,
    UPSAMPLED,
    build_variant,
    fit_variant,
    pick_variant,
)


def test_the_checks_verdict_picks_the_variant():
    lite0 = get_base("efficientnet_lite0")
    assert pick_variant(True, lite0, 224) == (EARLIER, 5, 0)  # after stage5, 112 features
    assert pick_variant(False, lite0, 224) == (UPSAMPLED, 8, 320)
    assert pick_variant(False, lite0, 32)[2] == 64  # always larger than the run's size
    assert pick_variant(True, get_base("tiny"), 32) is None  # 3 blocks: nothing to cut


def test_an_upsampled_features_model_is_cached_apart():
    spec = FeatureSpec("vgg16", "abc", 32, 5, "avg", {}, "float32")
    assert dataclasses.replace(spec, upsample_to=64).key() != spec.key()


@pytest.mark.parametrize(("base", "deep"), [("efficientnet_lite0", True), ("tiny", False)])
def test_the_saved_variant_computes_the_features_it_was_fitted_on(image_folder, base, deep):
    splits = load_splits(image_folder, 0.2, 1337)
    _, blocks, upsample_to = pick_variant(deep, get_base(base), 32)
    job = FeatureModel(base, "none", 0, 32, "float32", blocks, batch_size=8,
                       upsample_to=upsample_to)
    variant = fit_variant(job, splits, False, NullReporter(), use_cache=False)
    model = build_variant(variant)
    assert model.input_shape == (None, 32, 32, 3)  # reads images at the run's size
    if not deep:
        assert model.get_layer("features").get_layer("resize_for_base").output.shape[1] == 64
    probabilities = model.predict(build_dataset(list(splits.val.sources), None, 32, 8),
                                  verbose=0)
    right = probabilities.argmax(axis=1) == splits.val.labels
    np.testing.assert_array_equal(right, variant.right)


def test_a_run_keeps_the_winning_variant_as_a_candidate(tmp_path, monkeypatch):
    data = write_class_folder(tmp_path / "data", per_class=10)
    checks = Adaptation(folds=3, images=24, pixel_accuracy=0.5, probe_accuracy=0.9,
                        mirrored_accuracy=0.5, deep=False, mirror_changes_labels=False,
                        seconds=0.1)
    monkeypatch.setattr(recipe, "assess", lambda *args, **kwargs: checks)

    probe = recipe._probe

    def losing(t):  # as if the probe got every val image wrong: any variant beats it
        found, right = probe(t)
        return found, np.zeros_like(right)

    monkeypatch.setattr(recipe, "_probe", losing)
    reporter = Recorder()
    recipe.finetune(FinetuneConfig(
        data=DataConfig(data_dir=data, image_size=32, batch_size=8), output=tmp_path / "run",
        base="tiny", weights="none", epochs=1, finetune_epochs=0, patience=0), reporter)
    from transferkit.runs.directory import read_record

    record = read_record(tmp_path / "run")
    variant = record.candidate(UPSAMPLED)
    assert variant is not None and variant.kind == "variant"
    assert variant.details["base_size"] == 64
    assert variant.won and UPSAMPLED in record.choice.val_correct
    assert (tmp_path / "run" / "checkpoints" / f"best-{UPSAMPLED}.keras").is_file()
    assert any(m.startswith("Probe on the features at 64 px") for m in reporter.messages)
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Probe on the features at 64 px" in page and "beat the probe beyond noise" in page
