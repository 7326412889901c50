"""The linear probe, the choice among candidate models, and temperature scaling, on synthetic
features whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Recorder

from transferkit.calibration import (
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    log_loss,
    scale,
)
from transferkit.stats import paired_margin
from transferkit.training.choice import choose, describe
from transferkit.training.probe import FALLBACK_C, PROBE_CS, fit_probe


def blobs(n_per_class: int, classes: int, dim: int = 16, spread: float = 1.0, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return (centres[labels] + rng.normal(0, spread, (len(labels), dim))).astype(np.float32), \
        labels


def test_the_probe_is_a_softmax_layer_that_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(20, 4, spread=3.0)
    probe = fit_probe(x, y, 4)
    assert probe.c in PROBE_CS and probe.folds == 5
    reference = LogisticRegression(C=probe.c, max_iter=3000, tol=1e-3).fit(x, y)
    ours, theirs = probe.probabilities(x), reference.predict_proba(x)
    np.testing.assert_allclose(ours, theirs, atol=0.02)  # both stop at tol 1e-3
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()
    assert probe.kernel.shape == (16, 4) and probe.bias.shape == (4,)


def test_the_probe_regularises_more_when_the_data_is_noisier():
    clean = fit_probe(*blobs(20, 3, spread=0.5), 3)
    noisy = fit_probe(*blobs(20, 3, spread=6.0), 3)
    assert noisy.c < clean.c


def test_two_classes_give_two_softmax_columns():
    x, y = blobs(10, 2)
    probe = fit_probe(x, y, 2)
    assert probe.kernel.shape == (16, 2)
    assert (probe.probabilities(x).argmax(axis=1) == y).mean() > 0.9


def test_a_class_with_one_training_image_skips_cross_validation():
    x, y = blobs(6, 3)
    x, y = np.concatenate([x, np.full((1, 16), 12.0, np.float32)]), np.concatenate([y, [3]])
    probe = fit_probe(x, y, 4)
    assert probe.folds == 0 and probe.c == FALLBACK_C
    assert probe.probabilities(x[-1:]).argmax() == 3


def test_few_images_per_class_use_as_many_folds_as_the_smallest_class_allows():
    x, y = blobs(3, 3)
    assert fit_probe(x, y, 3).folds == 3


def test_paired_margin_counts_only_disagreements():
    a = np.array([True, True, False, False, True])
    b = np.array([True, False, True, True, True])
    assert paired_margin(a, b) == (1, pytest.approx(3 ** 0.5))


def test_the_simpler_candidate_is_kept_unless_beaten_by_more_than_noise():
    n = 60
    probe = np.zeros(n, bool)
    probe[:50] = True
    within_noise = probe.copy()
    within_noise[50:54] = True  # 4 gained...
    within_noise[:2] = False  # ...2 lost: +2 with noise sqrt(6) = 2.45
    choice = choose({"probe": probe, "finetune": within_noise})
    assert choice.kept == "probe"
    assert choice.comparisons[0].margin == 2 and not choice.comparisons[0].won
    assert "within noise" in describe(choice)
    clear_win = probe.copy()
    clear_win[50:54] = True  # +4 with noise 2
    choice = choose({"probe": probe, "head": within_noise, "finetune": clear_win})
    assert choice.kept == "finetune"
    assert choice.val_correct == {"probe": 50, "head": 52, "finetune": 54} and choice.n == n
    assert [c.simpler for c in choice.comparisons] == ["probe", "probe"]
    assert describe(choice) == "Kept 'finetune': +4 of 60 val images (noise 2.0) over 'probe'."


def test_a_tie_keeps_the_simpler_candidate():
    same = np.array([True, False, True])
    assert choose({"probe": same, "finetune": same.copy()}).kept == "probe"


def overconfident(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits), so those probabilities are calibrated; the model
    reports softmax(3 * logits), three times too sure."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 4))
    calibrated = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])
    sharp = np.exp(3 * logits)
    return sharp / sharp.sum(axis=1, keepdims=True), labels


def test_temperature_scaling_undoes_overconfidence():
    probabilities, labels = overconfident()
    temperature = fit_temperature(probabilities, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    calibrated = scale(probabilities, temperature)
    assert (calibrated.argmax(axis=1) == probabilities.argmax(axis=1)).all()
    assert expected_calibration_error(calibrated, labels) < \
        expected_calibration_error(probabilities, labels) / 3
    assert log_loss(calibrated, labels) < log_loss(probabilities, labels)


def test_a_calibrated_model_keeps_its_temperature_when_there_is_nothing_to_gain():
    probabilities, labels = overconfident()
    calibrated = scale(probabilities, fit_temperature(probabilities, labels))
    assert fit_temperature(calibrated, labels) == pytest.approx(1.0, abs=0.05)


def test_a_perfect_val_split_cannot_inform_a_temperature():
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8]])
    assert fit_temperature(probabilities, np.array([0, 1])) is None  # it would sharpen forever


def test_expected_calibration_error_of_known_bins():
    probabilities = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 6 + [1] * 4)  # confident 0.9, right 0.6
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.3)


def test_folding_the_temperature_into_the_softmax_layer_equals_scaling():
    import keras

    x = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    layer = keras.layers.Dense(3, activation="softmax")
    before = keras.ops.convert_to_numpy(layer(x))
    fold_temperature(layer, 2.5)
    after = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(after, scale(before, 2.5), atol=1e-5)


def _fake_features(wrong: dict[str, int]):
    """Features that separate the classes, except for the first `wrong[base]` images, whose
    signal points at the next class; a base not in `wrong` gets noise alone."""

    def features(base, weights, data, images, reporter, use_cache, engine=None):
        values = np.random.default_rng(0).normal(size=(len(images), 8))
        if base in wrong:
            target = images.labels.copy()
            target[:wrong[base]] = (target[:wrong[base]] + 1) % 3
            values[np.arange(len(images)), target] += 8
        return values

    return features


def test_bases_rank_by_cross_validated_probe_accuracy(monkeypatch, image_folder):
    """A base whose features separate the classes and one of misleading signal: the first
    ranks first, each with its interval over every train and val image."""
    from transferkit.commands import bases as ranking
    from transferkit.config import DataConfig

    monkeypatch.setattr(ranking, "available_bases",
                        lambda: ["efficientnet_lite0", "efficientnet_lite2"])
    monkeypatch.setattr(ranking, "base_features", _fake_features({"efficientnet_lite2": 0}))
    ranked = ranking.rank_bases(DataConfig(data_dir=image_folder))
    ranks = ranked.ranks
    assert [r.base for r in ranks] == ["efficientnet_lite2", "efficientnet_lite0"]
    assert ranked.best == "efficientnet_lite2"
    assert ranks[0].score.accuracy > 0.9 and ranks[0].score.n == 18
    assert ranks[0].score.low < ranks[0].score.accuracy <= ranks[0].score.high
    assert ranks[1].score.accuracy < ranks[0].score.accuracy
    assert ranks[1].cost == 1.0 and ranks[0].cost > 1.4  # Lite2: more parameters, 260 px


def test_a_costlier_base_within_noise_of_a_cheaper_one_is_not_chosen(monkeypatch, image_folder):
    from transferkit.commands import bases as ranking
    from transferkit.config import DataConfig

    monkeypatch.setattr(ranking, "available_bases",
                        lambda: ["efficientnet_lite2", "efficientnet_lite0"])
    monkeypatch.setattr(ranking, "base_features", _fake_features(
        {"efficientnet_lite0": 1, "efficientnet_lite2": 0}))  # one image more right: noise
    ranked = ranking.rank_bases(DataConfig(data_dir=image_folder))
    assert ranked.best == "efficientnet_lite0"
    assert [r.base for r in ranked.ranks] == ["efficientnet_lite0", "efficientnet_lite2"]
    assert ranked.ranks[1].score.correct == ranked.ranks[0].score.correct + 1


def test_finetune_auto_trains_the_chosen_base(monkeypatch, image_folder, tmp_path):
    import tinybase

    from transferkit.commands import bases as ranking
    from transferkit.commands.finetune import finetune
    from transferkit.config import DataConfig, FinetuneConfig
    from transferkit.runs.directory import read_record

    weights = tmp_path / "tiny.weights.h5"
    tinybase.SPEC.build((32, 32, 3)).save_weights(weights)
    monkeypatch.setattr(tinybase.SPEC.imagenet, "available", lambda: True)
    monkeypatch.setattr(tinybase.SPEC.imagenet, "path", lambda: weights)
    monkeypatch.setattr(ranking, "available_bases", lambda: ["tiny"])
    reporter = Recorder()
    finetune(FinetuneConfig(
        adapt=False, data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
        output=tmp_path / "run", base="auto", finetune_epochs=0), reporter)
    assert read_record(tmp_path / "run").base == "tiny"
    assert any(m.startswith("Bases ranked on the data: tiny ") for m in reporter.messages)


def test_the_combined_candidate_is_one_plain_model_of_the_bases_side_by_side(
        monkeypatch, tmp_path):
    """Two small bases with weights files the test writes stand in for the offline Lites:
    the run's own gives every image the same features (all its weights zero), so its probe
    names one class; the second separates the shapes, so the combined probe wins beyond
    noise and becomes a model of its own."""
    import dataclasses

    import tinybase
    from conftest import write_class_folder

    from transferkit.bases import BASES
    from transferkit.commands.finetune import finetune
    from transferkit.config import DataConfig, FinetuneConfig
    from transferkit.data.pipeline import build_dataset
    from transferkit.runs.checkpoints import best_checkpoint
    from transferkit.runs.directory import load_keras_file, read_record
    from transferkit.training.candidates import combined

    class Weights:
        def __init__(self, path):
            self.path_ = path

        def available(self):
            return True

        def path(self):
            return self.path_

    import keras

    image_folder = write_class_folder(tmp_path / "data", per_class=15)  # 9 val images
    specs = {}
    for name, seed in (("tiny", 1), ("tiny2", 2)):
        keras.utils.set_random_seed(seed)
        weights = tmp_path / f"{name}.weights.h5"
        base = tinybase.SPEC.build((32, 32, 3))
        if name == "tiny":
            base.set_weights([np.zeros_like(w) for w in base.get_weights()])
        base.save_weights(weights)
        specs[name] = dataclasses.replace(tinybase.SPEC, name=name, imagenet=Weights(weights))
        monkeypatch.setitem(BASES, name, specs[name])
    monkeypatch.setattr(combined, "COMBINABLE", ("tiny", "tiny2"))
    reporter = Recorder()
    finetune(FinetuneConfig(
        adapt=False, data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
        output=tmp_path / "run", base="tiny", finetune_epochs=0), reporter)
    record = read_record(tmp_path / "run")
    fitted = record.candidate("combined")
    assert fitted is not None and fitted.details["bases"] == ["tiny", "tiny2"]
    assert "combined" in record.choice.val_correct
    assert any(m.startswith("Combined probe on tiny, tiny2 side by side") for m in
               reporter.messages)
    model = load_keras_file(best_checkpoint(tmp_path / "run", "combined"), "")  # safe mode
    assert model.get_layer("combined_features").output.shape[-1] == 2 * tinybase.WIDTHS[-1]
    val = [r for r in csv_rows(tmp_path / "run" / "splits.csv") if r["split"] == "val"]
    names = record.class_names
    probabilities = model.predict(build_dataset([str(image_folder / r["path"]) for r in val],
                                                None, 32, 8), verbose=0)
    right = sum(names[p] == r["label"]
                for p, r in zip(probabilities.argmax(axis=1), val, strict=True))
    assert right == fitted.val_correct == record.choice.val_correct["combined"]


def csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bases_rank_shows_every_base_by_its_whole_name_and_the_chosen_one(monkeypatch,
                                                                         image_folder):
    from typer.testing import CliRunner

    from transferkit.cli.app import app
    from transferkit.commands import bases as ranking

    monkeypatch.setattr(ranking, "available_bases", lambda: list(combined_names()))
    monkeypatch.setattr(ranking, "base_features", _fake_features(
        dict.fromkeys(combined_names(), 0)))
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, ["bases", "--rank", str(image_folder)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "efficientnet_lite" in line]
    assert [line.split()[1] for line in rows] == list(combined_names())  # a tie: cheapest first
    assert rows[0].rstrip().endswith("chosen") and "chosen" not in "".join(rows[1:])


def combined_names():
    return ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
