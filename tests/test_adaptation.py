"""The checks that decide, from the training data, how deep to fine-tune and whether flips
keep labels; and that finetune records and applies what they decide."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import Recorder
from PIL import Image

from transferkit.bases import get_base
from transferkit.commands.finetune import finetune
from transferkit.config import TOP_BLOCKS, AugmentConfig, DataConfig, FinetuneConfig
from transferkit.runs.directory import read_record
from transferkit.runs.records import Adaptation
from transferkit.training.adaptation import MAX_IMAGES, assess, per_class_sample
from transferkit.training.plan import DEEP_LR_SCALE, DEEP_WARMUP_EPOCHS, build_plan

LITE0 = get_base("efficientnet_lite0")  # 8 blocks


def _write(folder: Path, name: str, pixels: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def _ramp(direction: int, index: int, size: int = 24) -> np.ndarray:
    """A grey ramp that brightens to the right (1) or to the left (-1), with noise: the class
    is only in its handedness, so a mirror image is the other class."""
    rng = np.random.default_rng(index)
    ramp = np.linspace(30, 220, size)[::direction]
    image = np.tile(ramp, (size, 1))[..., None].repeat(3, axis=2)
    return image + rng.normal(0, 20, image.shape)


def _colour(cls: int, index: int, size: int = 24) -> np.ndarray:
    """A symmetric blob, red or blue: mirroring keeps the class."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2)[..., None]
    colour = np.array([200, 40, 40]) if cls == 0 else np.array([40, 40, 200])
    return np.where(disc, colour, 120) + rng.normal(0, 20, (size, size, 3))


def test_handed_classes_with_useless_features_go_deep_without_flips(tmp_path):
    labels = np.repeat([0, 1], 20)
    sources = [_write(tmp_path / str(c), f"{i}", _ramp(1 if c == 0 else -1, i))
               for i, c in enumerate(labels)]
    noise = np.random.default_rng(0).normal(size=(len(labels), 16))  # features know nothing
    found = assess(sources, labels, noise, c=1.0, balanced=False, seed=0)
    assert found is not None
    assert found.pixel_accuracy > 0.9 and found.mirrored_accuracy < 0.2
    assert found.deep and found.mirror_changes_labels
    assert found.folds == 5 and found.images == 40
    assert "goes deep" in found.describe() and "no left-right flips" in found.describe()


def test_symmetric_classes_with_telling_features_stay_shallow_with_flips(tmp_path):
    labels = np.repeat([0, 1], 20)
    sources = [_write(tmp_path / str(c), f"{i}", _colour(c, i)) for i, c in enumerate(labels)]
    rng = np.random.default_rng(1)
    features = np.eye(2)[labels] * 3 + rng.normal(0, 0.3, (len(labels), 2))
    found = assess(sources, labels, features, c=1.0, balanced=False, seed=0)
    assert found is not None
    assert found.probe_accuracy == 1.0 and found.mirrored_accuracy == found.pixel_accuracy
    assert not found.deep and not found.mirror_changes_labels
    assert "fit the data" in found.describe() and "mirroring keeps labels" in found.describe()


def test_a_class_with_one_training_image_is_not_checked(tmp_path):
    labels = np.array([0, 0, 0, 1])
    sources = [_write(tmp_path, f"{i}", _colour(c, i)) for i, c in enumerate(labels)]
    assert assess(sources, labels, np.zeros((4, 2)), 1.0, False, 0) is None


def test_large_sets_are_sampled_per_class():
    labels = np.r_[np.zeros(3 * MAX_IMAGES, int), np.ones(3, int)]
    picked = per_class_sample(labels, seed=0)
    assert abs(len(picked) - MAX_IMAGES) <= 5 and (labels[picked] == 1).sum() == 3
    assert len(np.unique(picked)) == len(picked)
    assert list(per_class_sample(labels[:10], 0)) == list(range(10))


def _handed_folder(root: Path, per_class: int = 12) -> Path:
    for c, direction in (("right", 1), ("left", -1)):
        for i in range(per_class):
            _write(root / "train" / c, f"{i}", _ramp(direction, 1000 * (direction + 1) + i))
            if i < 4:
                _write(root / "val" / c, f"{i}", _ramp(direction, 5000 * (direction + 1) + i))
    return root


def _found(deep: bool, mirror: bool) -> Adaptation:
    return Adaptation(folds=5, images=100, pixel_accuracy=0.9, probe_accuracy=0.8,
                      mirrored_accuracy=0.3 if mirror else 0.9, deep=deep,
                      mirror_changes_labels=mirror, seconds=1.0)


def test_going_deep_tunes_every_block_faster_after_a_warm_up_unless_told_otherwise():
    config = FinetuneConfig(data=DataConfig(data_dir=Path("d")), output=None)
    deep = build_plan(config, LITE0, found=_found(deep=True, mirror=False))
    assert deep.unfreeze_blocks == 8 and deep.augment.horizontal_flip
    assert deep.finetune_lr == pytest.approx(DEEP_LR_SCALE * 1e-4)
    assert deep.finetune_schedule.warmup_epochs == DEEP_WARMUP_EPOCHS
    told = build_plan(dataclasses.replace(config, finetune_lr=5e-5), LITE0,
                      found=_found(True, False))
    assert (told.unfreeze_blocks, told.finetune_lr, told.finetune_schedule.warmup_epochs) == (
        8, 5e-5, 0)
    assert told.stood == ("--finetune-lr 5e-05",)
    fixed = build_plan(dataclasses.replace(config, unfreeze_blocks=3), LITE0,
                       found=_found(True, True))
    assert fixed.unfreeze_blocks == 3 and fixed.finetune_lr == pytest.approx(1e-4)
    assert not fixed.augment.horizontal_flip
    assert fixed.stood == ("--unfreeze-blocks 3",)
    shallow = build_plan(config, LITE0, found=_found(deep=False, mirror=False))
    assert shallow.augment.horizontal_flip is True  # the default, resolved by the check
    assert shallow.unfreeze_blocks == TOP_BLOCKS and shallow.stood == ()
    assert shallow.finetune_schedule == config.finetune_schedule
    assert build_plan(config, LITE0, found=_found(True, True)).stood == ()
    assert config.augment.horizontal_flip is None  # nothing written back


def test_going_deep_smooths_the_labels_unless_told_otherwise():
    from transferkit.training.plan import DEEP_LABEL_SMOOTHING

    config = FinetuneConfig(data=DataConfig(data_dir=Path("d")), output=None)
    assert build_plan(config, LITE0, found=_found(True, False)).label_smoothing == \
        DEEP_LABEL_SMOOTHING > 0
    assert build_plan(config, LITE0, found=_found(False, False)).label_smoothing == 0
    assert build_plan(config, LITE0).label_smoothing == 0  # the checks did not run
    for given in (0.0, 0.2):
        told = dataclasses.replace(config, label_smoothing=given)
        assert build_plan(told, LITE0, found=_found(True, False)).label_smoothing == given
        assert build_plan(told, LITE0, found=_found(False, False)).label_smoothing == given


def test_going_deep_learns_for_longer_unless_the_epochs_were_given():
    from transferkit.training.plan import DEEP_FINETUNE_EPOCHS, FINETUNE_EPOCHS, plan_stages

    config = FinetuneConfig(data=DataConfig(data_dir=Path("d")), output=None)
    deep = build_plan(config, LITE0, found=_found(deep=True, mirror=False))
    shallow = build_plan(config, LITE0, found=_found(deep=False, mirror=False))
    assert (deep.finetune_epochs, shallow.finetune_epochs) == (DEEP_FINETUNE_EPOCHS,
                                                               FINETUNE_EPOCHS)
    assert plan_stages(config, deep, LITE0)[-1].epochs == DEEP_FINETUNE_EPOCHS
    given = dataclasses.replace(config, finetune_epochs=7)
    assert build_plan(given, LITE0, found=_found(True, False)).finetune_epochs == 7
    none = build_plan(dataclasses.replace(config, finetune_epochs=0), LITE0,
                      found=_found(True, False))
    assert none.unfreeze_blocks == 0 and plan_stages(config, none, LITE0) == []
    assert config.finetune_epochs is None  # nothing written back


def test_flip_flags_the_user_gave_stand_over_the_mirror_check():
    config = FinetuneConfig(data=DataConfig(data_dir=Path("d")), output=None)
    flips = dataclasses.replace(config, augment=AugmentConfig(horizontal_flip=True))
    plan = build_plan(flips, LITE0, found=_found(False, mirror=True))
    assert plan.augment.horizontal_flip is True and plan.stood == ("--horizontal-flip",)
    no_flips = dataclasses.replace(config, augment=AugmentConfig(horizontal_flip=False))
    assert build_plan(no_flips, LITE0, found=_found(False, mirror=False)
                      ).augment.horizontal_flip is False
    assert build_plan(config, LITE0, found=_found(False, mirror=True)
                      ).augment.horizontal_flip is False


def test_finetune_records_and_applies_the_decisions(tmp_path):
    config = FinetuneConfig(data=DataConfig(data_dir=_handed_folder(tmp_path / "data"),
                                            image_size=32, batch_size=8),
                            output=tmp_path / "run", weights="none", finetune_epochs=1,
                            unfreeze_blocks=1, patience=0)  # the checks run, whatever the probe
    reporter = Recorder()
    finetune(config, reporter)
    record = read_record(tmp_path / "run")
    found = record.adaptation
    # (a Lite0 from scratch once gave every image the same features, so the pixels always
    # looked "deep"; since it starts from EfficientNet's init, the unit tests above cover
    # going deep, and this one what the run records and applies)
    assert found is not None and found.mirror_changes_labels
    assert any(m.startswith("Data checks: ") for m in reporter.messages)
    assert record.config == config  # as given
    assert record.plan is not None and record.plan.unfreeze_blocks == 1  # the user's depth
    assert record.plan.augment.horizontal_flip is False  # the check's finding, applied
    assert record.plan == build_plan(config, LITE0, found=found)


def test_a_head_stage_that_augments_is_checked_for_flips_too(tmp_path):
    config = FinetuneConfig(data=DataConfig(data_dir=_handed_folder(tmp_path / "data"),
                                            image_size=32, batch_size=8),
                            output=tmp_path / "run", weights="none", base="tiny", epochs=1,
                            finetune_epochs=0, patience=0)  # the head stage runs, whatever
    finetune(config)  # the probe scores (a stage with no room is skipped, and needs no checks)
    record = read_record(tmp_path / "run")
    assert record.adaptation is not None and record.adaptation.mirror_changes_labels
    assert record.plan is not None and record.plan.augment.horizontal_flip is False


def test_no_adapt_keeps_the_options(tmp_path):
    config = FinetuneConfig(data=DataConfig(data_dir=_handed_folder(tmp_path / "data"),
                                            image_size=32, batch_size=8),
                            output=tmp_path / "run", weights="none", base="tiny", finetune_epochs=1,
                            adapt=False)
    finetune(config)
    record = read_record(tmp_path / "run")
    assert record.adaptation is None  # flips stay at their default: on
    assert record.config.augment.horizontal_flip is None
    assert record.plan is not None and record.plan.augment.horizontal_flip is True
    assert record.plan.unfreeze_blocks == TOP_BLOCKS
