"""evaluate: metrics against a hand computation, and the reports it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.evaluate import classification_metrics


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
