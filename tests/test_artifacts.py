"""Run directories, feature files and prediction files: written whole, read back safely."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferkit.artifacts import (
    FeatureSet,
    check_new_output,
    load_features,
    load_run,
    save_features,
    save_predictions,
)
from transferkit.errors import ArtifactError


def test_existing_outputs_are_never_replaced_silently(tmp_path: Path):
    check_new_output(tmp_path / "new", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_new_output(empty, overwrite=False)
    (empty / "x").write_text("keep me")
    with pytest.raises(ArtifactError, match="already exists and is not empty.*--overwrite"):
        check_new_output(empty, overwrite=False)
    check_new_output(empty, overwrite=True)
    with pytest.raises(ArtifactError, match="is a file"):
        check_new_output(empty / "x", overwrite=True)


def test_run_round_trip(trained_run: Path):
    run = load_run(trained_run)
    assert run.class_names == ("circles", "squares", "stripes") and run.image_size == 32
    info = json.loads((trained_run / "run.json").read_text())
    assert [s["name"] for s in info["stages"]] == ["head", "finetune"]
    assert info["stages"][1]["trainable_params"] > info["stages"][0]["trainable_params"]
    assert info["preprocessing"]["channel_order"] == "rgb"
    assert {"tensorflow", "keras", "transferkit"} <= set(info["versions"])
    history = json.loads((trained_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert not list(trained_run.glob(".*tmp*"))  # no temp files left behind


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "run.json").unlink(), "has no run.json"),
    (lambda d: (d / "run.json").write_text("{not json"), "Could not read"),
    (lambda d: (d / "model.keras").unlink(), "has no model.keras"),
    (lambda d: (d / "model.keras").write_bytes(b"garbage"), "Could not load"),
    (lambda d: _edit(d, format_version=99), "run format version 99"),
    (lambda d: _edit(d, class_names="cats"), "no valid class_names"),
    (lambda d: _edit(d, class_names=["a", "b"]), "predicts 3 classes"),
])
def test_damaged_run_directories_fail_clearly(trained_run: Path, tmp_path: Path, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    damage(run_dir)
    with pytest.raises(ArtifactError, match=message):
        load_run(run_dir)


def _edit(run_dir: Path, **changes) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, **changes}))


def test_missing_run_directory(tmp_path: Path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_features_round_trip_without_pickle(tmp_path: Path):
    features = FeatureSet(
        features=np.arange(6, dtype=np.float32).reshape(3, 2), labels=np.array([0, 1, 1]),
        splits=np.array(["train", "train", "val"]), paths=np.array(["a/1.jpg", "b/ü.png", "b/3"]),
        class_names=("a", "b"), meta={"base": "vgg16", "blocks": 2})
    path = tmp_path / "features.npz"
    save_features(path, features)
    loaded = load_features(path)
    np.testing.assert_array_equal(loaded.features, features.features)
    assert loaded.paths.tolist() == ["a/1.jpg", "b/ü.png", "b/3"]
    assert loaded.class_names == ("a", "b") and loaded.meta["blocks"] == 2
    x_val, y_val = loaded.split("val")
    assert x_val.shape == (1, 2) and y_val.tolist() == [1]
    with pytest.raises(ArtifactError, match="already exists"):
        save_features(path, features)


def test_predictions_csv_and_json(tmp_path: Path):
    rows = [{"path": "a.jpg", "label": "cat", "probability": 0.9, "true_label": None,
             "error": None, "top_k": [{"label": "cat", "probability": 0.9},
                                      {"label": "dog", "probability": 0.1}]},
            {"path": "b.jpg", "label": None, "probability": None, "true_label": None,
             "error": "unreadable image", "top_k": []}]
    save_predictions(tmp_path / "p.csv", rows, top_k=2)
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["label_2"] == "dog" and table[1]["error"] == "unreadable image"
    save_predictions(tmp_path / "p.json", rows, top_k=2)
    assert json.loads((tmp_path / "p.json").read_text())[0]["top_k"][1]["label"] == "dog"
