"""The "none of these" score: what it ranks, its threshold, its file, and predict's use."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from transferkit.commands.predict import UNKNOWN, predict, predictions_text
from transferkit.config import PredictConfig
from transferkit.errors import ArtifactError, ConfigError
from transferkit.novelty import fit_novelty, load_novelty
from transferkit.runs.directory import NOVELTY_FILE


def _clusters(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    picks = rng.integers(len(centres), size=n)
    return centres[picks] + 0.1 * rng.normal(size=(n, centres.shape[1]))


def _softmax_like(n: int, k: int, top: float) -> np.ndarray:
    p = np.full((n, k), (1 - top) / (k - 1))
    p[:, 0] = top
    return p


def test_images_unlike_every_class_score_above_the_threshold_val_set():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    train, val = _clusters(rng, 60, centres), _clusters(rng, 40, centres)
    novelty = fit_novelty(train, val, _softmax_like(40, 3, 0.9))
    assert novelty is not None and novelty.bank.dtype == np.float16
    known = novelty.score(_clusters(rng, 200, centres), _softmax_like(200, 3, 0.9))
    strange = novelty.score(rng.normal(size=(50, 16)) * 3, _softmax_like(50, 3, 0.9))
    assert (known <= novelty.threshold).mean() >= 0.85  # about the 95 % val was set for
    assert (strange > novelty.threshold).all()
    # The top probability counts too: the same features, less sure, are more novel.
    features = _clusters(rng, 10, centres)
    assert (novelty.score(features, _softmax_like(10, 3, 0.4))
            > novelty.score(features, _softmax_like(10, 3, 0.9))).all()
    assert fit_novelty(train, val[:1], _softmax_like(1, 3, 0.9)) is None  # nothing to set it


def test_the_novelty_file_round_trips_and_a_damaged_one_is_named(tmp_path: Path):
    rng = np.random.default_rng(1)
    novelty = fit_novelty(rng.normal(size=(30, 8)), rng.normal(size=(10, 8)),
                          _softmax_like(10, 2, 0.7))
    novelty.save(tmp_path / NOVELTY_FILE)
    again = load_novelty(tmp_path / NOVELTY_FILE, 8)
    probe = rng.normal(size=(5, 8))
    np.testing.assert_allclose(again.score(probe, _softmax_like(5, 2, 0.6)),
                               novelty.score(probe, _softmax_like(5, 2, 0.6)), rtol=1e-6)
    assert load_novelty(tmp_path / "absent.npz", 8) is None
    with pytest.raises(ArtifactError, match="does not fit"):
        load_novelty(tmp_path / NOVELTY_FILE, 9)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ArtifactError, match="damaged"):
        load_novelty(tmp_path / "bad.npz", 8)


def test_predict_scores_every_image_and_rejects_those_above_the_runs_threshold(
        trained_run: Path, image_folder: Path):
    from transferkit.runs.directory import read_record

    record = read_record(trained_run)
    assert record.novelty is not None and (trained_run / NOVELTY_FILE).exists()
    plain = predict(PredictConfig(run_dir=trained_run, paths=(image_folder,)))
    scores = [p.novelty for p in plain.predictions]
    assert all(isinstance(s, float) and np.isfinite(s) for s in scores)
    assert plain.unknown == 0 and "novelty" in predictions_text(plain, 1, "csv").splitlines()[0]
    rejected = predict(PredictConfig(run_dir=trained_run, paths=(image_folder,),
                                     reject_unknown=True))
    threshold = load_novelty(trained_run / NOVELTY_FILE).threshold
    assert rejected.novelty_threshold == pytest.approx(threshold)
    assert [p.label == UNKNOWN for p in rejected.predictions] == [s > threshold for s in scores]
    with_tta = predict(PredictConfig(run_dir=trained_run, paths=(image_folder,), tta=True))
    assert all(p.novelty is not None for p in with_tta.predictions)
    assert "Novelty" in (trained_run / "report.html").read_text()


def test_a_run_without_a_novelty_score_predicts_without_one_and_refuses_reject_unknown(
        trained_run: Path, image_folder: Path, tmp_path: Path):
    older = tmp_path / "older"
    shutil.copytree(trained_run, older)
    (older / NOVELTY_FILE).unlink()
    report = predict(PredictConfig(run_dir=older, paths=(image_folder,)))
    assert all(p.novelty is None for p in report.predictions)
    assert "novelty" not in predictions_text(report, 1, "csv").splitlines()[0]
    with pytest.raises(ConfigError, match="--reject-unknown needs the run's novelty score"):
        predict(PredictConfig(run_dir=older, paths=(image_folder,), reject_unknown=True))
