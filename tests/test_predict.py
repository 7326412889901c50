"""predict's core: test-time augmentation, the unknown threshold, paths and patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.commands.predict import UNKNOWN, predict
from transferkit.config import PredictConfig
from transferkit.errors import ConfigError, DataError


def _probabilities(report) -> dict[str, np.ndarray]:
    return {p.path.name: np.array([v for _, v in sorted(p.top_k)]) for p in report.predictions}


def test_tta_on_a_uniform_image_equals_the_plain_prediction(trained_run: Path, tmp_path: Path):
    # Every crop and mirror of a uniform image is the same picture as the plain view.
    Image.new("RGB", (40, 40), (200, 90, 30)).save(tmp_path / "flat.png")
    plain = predict(PredictConfig(run_dir=trained_run, paths=(tmp_path,), top_k=3))
    tta = predict(PredictConfig(run_dir=trained_run, paths=(tmp_path,), top_k=3, tta=True))
    np.testing.assert_allclose(_probabilities(tta)["flat.png"], _probabilities(plain)["flat.png"],
                               atol=1e-5)
    assert tta.tta is not None and tta.tta.changed == 0 and tta.tta.mean_shift < 1e-5
    assert plain.tta is None


def test_tta_is_the_mean_over_the_ten_crops(trained_run: Path, image_folder: Path):
    from transferkit.augment import ten_crops, tta_load_size
    from transferkit.data.pipeline import load_image
    from transferkit.runs.directory import load_run

    files = sorted((image_folder / "circles").iterdir())[:2]
    plain = predict(PredictConfig(run_dir=trained_run, paths=tuple(files), top_k=3))
    tta = predict(PredictConfig(run_dir=trained_run, paths=tuple(files), top_k=3, tta=True))
    model = load_run(trained_run).model
    for path, got in zip(files, tta.predictions, strict=True):
        image = load_image(str(path), tta_load_size(32))[None]
        expected = model.predict(ten_crops(image, 32), verbose=0).mean(axis=0)
        names = load_run(trained_run).class_names
        np.testing.assert_allclose([dict(got.top_k)[n] for n in names], expected, atol=1e-5)
    before, after = _probabilities(plain), _probabilities(tta)
    assert tta.tta is not None and tta.tta.views == 10
    assert tta.tta.changed == sum(int(np.argmax(before[n]) != np.argmax(after[n]))
                                  for n in before)


def test_threshold_labels_low_confidence_unknown(trained_run: Path, image_folder: Path):
    plain = predict(PredictConfig(run_dir=trained_run, paths=(image_folder,)))
    top = [p.probability for p in plain.predictions]
    everything = predict(PredictConfig(run_dir=trained_run, paths=(image_folder,),
                                       threshold=min(1.0, max(top) + 1e-6)))
    assert everything.unknown == len(top)
    assert all(p.label == UNKNOWN for p in everything.predictions)
    row = everything.predictions[0].to_dict()
    assert row["best_guess"] == plain.predictions[0].label
    assert row["probability"] == plain.predictions[0].probability
    nothing = predict(PredictConfig(run_dir=trained_run, paths=(image_folder,), threshold=min(top)))
    assert nothing.unknown == 0
    assert [p.to_dict() for p in nothing.predictions] == [p.to_dict() for p in plain.predictions]
    with pytest.raises(ConfigError, match="--threshold must be a probability"):
        PredictConfig(run_dir=trained_run, paths=(image_folder,), threshold=1.5)


def test_glob_patterns_expand_recursively(trained_run: Path, image_folder: Path):
    report = predict(PredictConfig(run_dir=trained_run, paths=(image_folder / "**" / "*.png",)))
    names = {p.path.name for p in report.predictions}
    assert names and all(n.endswith(".png") for n in names) and len(names) == 9
    with pytest.raises(DataError, match="matches no files"):
        predict(PredictConfig(run_dir=trained_run, paths=(image_folder / "*.gif",)))
