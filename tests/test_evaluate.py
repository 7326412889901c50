"""evaluate: metrics against a hand computation, and the reports it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.metrics import classification_metrics


def test_metrics_equal_a_hand_computation():
    labels = np.array([0, 0, 0, 1, 1, 2])
    probabilities = np.array([
        [0.8, 0.1, 0.1],  # 0 -> 0
        [0.6, 0.3, 0.1],  # 0 -> 0
        [0.2, 0.7, 0.1],  # 0 -> 1 (0 second)
        [0.1, 0.8, 0.1],  # 1 -> 1
        [0.5, 0.1, 0.4],  # 1 -> 0 (1 third)
        [0.3, 0.3, 0.4],  # 2 -> 2
    ])
    e = classification_metrics(labels, probabilities, ("a", "b", "c"), top_k=2)
    assert e.accuracy == pytest.approx(4 / 6)
    assert e.top_k_accuracy == {1: pytest.approx(4 / 6), 2: pytest.approx(5 / 6)}
    np.testing.assert_array_equal(e.confusion, [[2, 1, 0], [1, 1, 0], [0, 0, 1]])
    # confidences 0.8, 0.6, 0.7, 0.8, 0.5, 0.4 (right, right, wrong, right, wrong, right), in
    # 15 bins: |1-0.8|*2/6 + |1-0.6|/6 + |0-0.7|/6 + |0-0.5|/6 + |1-0.4|/6
    assert e.calibration_error == pytest.approx((0.4 + 0.4 + 0.7 + 0.5 + 0.6) / 6)
    a, b, c = e.per_class
    assert (a.precision, a.recall, a.support) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall, b.support) == (pytest.approx(1 / 2), pytest.approx(1 / 2), 2)
    assert (c.precision, c.recall, c.f1) == (1.0, 1.0, 1.0)
    assert a.f1 == pytest.approx(2 / 3)
    assert e.macro_f1 == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_metrics_with_a_class_never_predicted():
    e = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), ("a", "b"))
    assert e.per_class[1].precision == 0.0 and e.per_class[1].f1 == 0.0


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_evaluate_cli_on_validation_split_and_on_a_folder(trained_run: Path, image_folder: Path,
                                                          tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(trained_run), "-o", str(out), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "validation split" in result.stdout and "Confusion matrix" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == len([r for r in (trained_run / "splits.csv").read_text()
                                     .splitlines() if r.endswith(",val")])
    assert set(metrics["top_k_accuracy"]) == {"1", "2"}
    assert _is_png(out / "confusion.png")
    if metrics["accuracy"] < 1:
        assert _is_png(out / "mistakes.png")

    again = runner.invoke(app, ["evaluate", str(trained_run), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.stderr

    folder = runner.invoke(app, ["evaluate", str(trained_run), str(image_folder), "-o",
                                 str(tmp_path / "eval2")])
    assert folder.exit_code == 0, folder.output
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["images"] == 18


def test_evaluate_gives_intervals_and_says_which_split_chose(trained_run: Path,
                                                             image_folder: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(trained_run), "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert "val accuracy" in shown and "95 % CI" in shown and "chose the epochs" in shown
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    low, high = metrics["accuracy_95ci"]
    assert low <= metrics["accuracy"] <= high and metrics["split_chose_the_model"]
    assert all(c["recall_low"] <= c["recall"] <= c["recall_high"] for c in metrics["per_class"])
    from conftest import write_class_folder

    new = write_class_folder(tmp_path / "new", per_class=2, offset=500)  # never seen
    held = runner.invoke(app, ["evaluate", str(trained_run), str(new), "-o",
                               str(tmp_path / "h")])
    assert "held out: nothing was chosen" in " ".join(held.stdout.split())
    held_metrics = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert not held_metrics["split_chose_the_model"]
    assert held_metrics["images_the_run_trained_or_chose_on"] == 0
    own = runner.invoke(app, ["evaluate", str(trained_run), str(image_folder), "-o",
                              str(tmp_path / "o")])  # the images it trained on
    assert "18 of its images trained the run or chose its model: not held out" in " ".join(
        own.stdout.split())
    own_metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert own_metrics["images_the_run_trained_or_chose_on"] == 18
    assert own_metrics["split"] == image_folder.name


def test_finetune_and_extract_score_the_test_split_once_at_the_end(presplit_folder: Path,
                                                                    tmp_path: Path):
    from transferkit.commands.extract import extract
    from transferkit.commands.finetune import finetune
    from transferkit.config import (
        AugmentConfig,
        DataConfig,
        ExtractConfig,
        FinetuneConfig,
        HeadConfig,
    )
    from transferkit.runs.directory import read_record

    data = DataConfig(data_dir=presplit_folder, image_size=32, batch_size=8)
    result = finetune(FinetuneConfig(adapt=False, patience=0,
                                     data=data, output=tmp_path / "run", weights="none",
                                     base="tiny", epochs=1, finetune_epochs=0,
                                     augment=AugmentConfig(enabled=False)))
    val, test = result.scores
    assert (val.split, val.n, val.chose) == ("val", 6, True)
    assert (test.split, test.n, test.chose) == ("test", 3, False)
    assert val.low <= val.accuracy <= val.high and test.low <= test.accuracy <= test.high
    assert read_record(tmp_path / "run").scores == result.scores
    extracted = extract(ExtractConfig(data=data, output=tmp_path / "f.npz", weights="none",
                                      head=HeadConfig(output=tmp_path / "head", epochs=2)))
    assert extracted.record is not None
    assert [(s.split, s.n) for s in extracted.record.scores] == [("val", 6), ("test", 3)]
