"""cv: stratified folds, out-of-fold predictions for every image, and the ensemble run that
predict and evaluate take; and the probe-first finetune it is built from."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, Recorder
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.config import DataConfig, FinetuneConfig
from transferkit.errors import ConfigError

TINY = {"image_size": 32, "batch_size": 8}


def test_a_probe_only_run_is_a_complete_calibrated_model(image_folder, tmp_path):
    from transferkit.commands.finetune import finetune
    from transferkit.runs.directory import load_run, read_record

    result = finetune(FinetuneConfig(adapt=False, data=DataConfig(data_dir=image_folder, **TINY),
                                     output=tmp_path / "run", weights="none", base="tiny",
                                     finetune_epochs=0))
    assert result.kept_stage == "probe" and result.stages == () and result.history == ()
    record = read_record(tmp_path / "run")
    assert record.probe is not None and record.probe.ready_after > 0
    assert record.choice.val_correct.keys() == {"probe"}
    assert 0.5 <= record.calibration.temperature <= 10
    assert record.scores[0].split == "val" and record.scores[0].chose
    assert load_run(tmp_path / "run").model.output_shape == (None, 3)
    page = (tmp_path / "run" / "report.html").read_text()
    for heading in ("Run", "How good it is", "On val (it chose the model)", "Embedding map"):
        assert f"<h2>{heading}</h2>" in page


def test_a_hidden_layer_needs_head_epochs_before_fine_tuning(image_folder):
    with pytest.raises(ConfigError, match="--head-epochs N"):
        FinetuneConfig(adapt=False,
                       data=DataConfig(data_dir=image_folder), output=None, dense_units=64)


@pytest.fixture(scope="module")
def cv_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-fold cv run from the command line, its recipe set by options and a --config file
    of nested tables, as run.json writes them."""
    work = tmp_path_factory.mktemp("cv")
    settings = work / "recipe.toml"
    settings.write_text('finetune_epochs = 1\nweights = "none"\n[data]\nimage_size = 32\n'
                        'batch_size = 8\n[optimizer]\nname = "sgd"\nmomentum = 0.8\n')
    result = CliRunner().invoke(app, ["cv", str(image_folder), "-o", str(work / "run"),
                                      "--folds", "2", "--no-adapt", "--config", str(settings),
                                      "--base", "tiny", "--learning-rate", "3e-4",
                                      "--no-augment"])
    assert result.exit_code == 0, result.output
    return work / "run"


def test_the_whole_recipe_reaches_every_fold(cv_run):
    for k in (1, 2):
        config = json.loads((cv_run / "folds" / f"fold-{k}" / "run.json").read_text())["config"]
        assert config["learning_rate"] == 3e-4 and config["optimizer"]["name"] == "sgd"
        assert config["optimizer"]["momentum"] == 0.8 and config["data"]["image_size"] == 32
        assert config["augment"]["enabled"] is False and config["finetune_epochs"] == 1


def test_every_image_gets_one_out_of_fold_prediction(cv_run, image_folder):
    with open(cv_run / "oof.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = sorted(p.relative_to(image_folder).as_posix()
                   for p in image_folder.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in rows) == paths
    assert {r["fold"] for r in rows} == {"1", "2"}
    for fold in ("1", "2"):  # stratified: every class held out in every fold
        assert {r["label"] for r in rows if r["fold"] == fold} == set(CLASSES)
        assert sum(r["fold"] == fold for r in rows) == len(rows) // 2
    for r in rows:
        probabilities = [float(r[k]) for k in r if k.startswith("p_")]
        assert sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert float(r["probability"]) == max(probabilities)
        assert float(r[f"p_{r['predicted']}"]) == max(probabilities)


def test_the_record_has_each_fold_and_the_out_of_fold_score(cv_run):
    record = json.loads((cv_run / "run.json").read_text())
    assert record["command"] == "cv" and record["status"] == "complete"
    cv = record["cross_validation"]
    assert cv["folds"] == 2 and sum(s["n"] for s in cv["fold_scores"]) == 18
    oof = record["scores"][0]
    assert oof["split"] == "out-of-fold" and oof["n"] == 18 and not oof["chose"]
    assert oof["low"] <= oof["accuracy"] <= oof["high"]
    for k in (1, 2):
        fold = json.loads((cv_run / "folds" / f"fold-{k}" / "run.json").read_text())
        assert fold["status"] == "complete" and fold["scores"][-1]["split"] == "test"


def test_splits_and_counts_say_how_cv_used_each_image(cv_run):
    with open(cv_run / "splits.csv", newline="") as f:
        splits = {r["path"]: r["fold"] for r in csv.DictReader(f)}
    with open(cv_run / "oof.csv", newline="") as f:
        assert splits == {r["path"]: r["fold"] for r in csv.DictReader(f)}
    record = json.loads((cv_run / "run.json").read_text())
    assert {k: sum(v.values()) for k, v in record["data"]["counts"].items()} == {
        "cross-validated": 18}


def test_the_cv_report_shows_folds_and_out_of_fold_predictions(cv_run):
    page = (cv_run / "report.html").read_text()
    assert "18 cross-validated" in page and " train, " not in page
    assert "<h2>On out-of-fold predictions" in page and "fold 2" in page
    assert "Mean fold accuracy" in page


def test_evaluate_refreshes_the_report_with_its_evaluation(cv_run, image_folder):
    result = CliRunner().invoke(app, ["evaluate", str(cv_run), str(image_folder)])
    assert result.exit_code == 0, result.output
    page = (cv_run / "report.html").read_text()
    # every image of DATA trained some fold: the page says the score is not held out
    assert f"<h2>On labelled folder &#x27;{image_folder}&#x27; (18 of 18 of its images " \
        f"trained or chose the model)</h2>" in page


def test_the_ensemble_averages_the_fold_models(cv_run):
    from transferkit.runs.directory import load_run

    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    ensemble = load_run(cv_run).model.predict(images, verbose=0)
    folds = [load_run(cv_run / "folds" / f"fold-{k}").model.predict(images, verbose=0)
             for k in (1, 2)]
    np.testing.assert_allclose(ensemble, np.mean(folds, axis=0), atol=1e-5)


def test_predict_takes_the_ensemble_and_evaluate_explains_its_missing_split(cv_run,
                                                                           image_folder):
    runner = CliRunner()
    found = runner.invoke(app, ["predict", str(cv_run), str(image_folder), "-o", "-"])
    assert found.exit_code == 0, found.output
    assert len(found.stdout.strip().splitlines()) == 19  # header + 18 images
    refused = runner.invoke(app, ["evaluate", str(cv_run)])
    assert refused.exit_code == 1 and "oof.csv" in refused.output


def test_too_many_folds_for_a_class_is_a_clear_error(image_folder, tmp_path):
    result = CliRunner().invoke(app, ["cv", str(image_folder), "-o", str(tmp_path / "cv"),
                                      "--folds", "7", "--weights", "none", "--image-size", "32"])
    assert result.exit_code == 1
    assert "--folds 7 needs at least 7 images per class" in result.output
    assert not (tmp_path / "cv").exists()


def test_gradcam_maps_each_image_for_its_class(trained_run, image_folder):
    from transferkit.reports.gradcam import gradcam, has_feature_map
    from transferkit.runs.directory import load_run

    run = load_run(trained_run)
    assert has_feature_map(run.model)
    sources = [str(p) for p in sorted(image_folder.rglob("*.png"))[:3]]
    cams = gradcam(run.model, sources, np.array([0, 1, 2]), run.image_size)
    assert cams.shape[0] == 3 and cams.ndim == 3
    assert cams.min() >= 0 and cams.max() <= 1


def test_an_ensemble_has_no_single_feature_map(cv_run):
    from transferkit.reports.gradcam import has_feature_map
    from transferkit.runs.directory import load_run

    assert not has_feature_map(load_run(cv_run).model)


def test_a_kept_probe_is_refitted_on_train_and_val_and_val_is_then_not_held_out(
        image_folder, tmp_path):
    from transferkit.commands.finetune import finetune
    from transferkit.runs.directory import load_run, read_record

    runs = {refit: tmp_path / f"refit-{refit}" for refit in (False, True)}
    finetune(FinetuneConfig(adapt=False, data=DataConfig(data_dir=image_folder, **TINY),
                            output=runs[False], weights="none", base="tiny", finetune_epochs=0))
    said = CliRunner().invoke(app, [
        "finetune", str(image_folder), "-o", str(runs[True]), "--refit", "--no-adapt",
        "--finetune-epochs", "0", "--weights", "none", "--base", "tiny", "--image-size", "32",
        "--batch-size", "8"])
    assert said.exit_code == 0, said.output
    assert "then fitted again on train + val (18 images)" in " ".join(said.stdout.split())
    record = read_record(runs[True])
    assert read_record(runs[False]).refit is None
    assert record.refit is not None and record.refit.images == 18
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    before, after = (load_run(runs[r]).model.predict(images, verbose=0) for r in (False, True))
    assert not np.allclose(before, after, atol=1e-4)  # the saved model learnt from val too
    assert "fitted again on train + val (18 images)" in (runs[True] / "report.html").read_text()
    result = CliRunner().invoke(app, ["evaluate", str(runs[True]), "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "not held out" in " ".join(result.stdout.split())


def _keep_the_last_candidate(monkeypatch):
    """Makes the run keep its last candidate (the fine-tuned model), whatever val says."""
    import transferkit.commands.finetune as module
    from transferkit.training.choice import choose

    def last(correct):
        return dataclasses.replace(choose(correct), kept=list(correct)[-1])

    monkeypatch.setattr(module, "choose", last)


class Epochs(Recorder):
    """Keeps each epoch's stage, number and the stage's last epoch too."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[tuple[str, int, int]] = []

    def epoch_ended(self, stage, epoch, epochs, metrics):
        self.epochs.append((stage, epoch, epochs))


def test_a_kept_finetuned_model_is_refitted_through_its_stages_to_their_kept_epochs(
        image_folder, tmp_path, monkeypatch):
    from transferkit.commands.finetune import finetune
    from transferkit.runs.checkpoints import best_checkpoint
    from transferkit.runs.directory import load_keras_file, load_run, read_record

    _keep_the_last_candidate(monkeypatch)
    run_dir, reporter = tmp_path / "run", Epochs()
    result = finetune(FinetuneConfig(adapt=False, patience=0, epochs=1, finetune_epochs=2,
                                     refit=True, data=DataConfig(data_dir=image_folder, **TINY),
                                     output=run_dir, weights="none", base="tiny"), reporter)
    record = read_record(run_dir)
    assert result.kept_stage == "finetune"
    kept = record.stages[-1].best_epoch
    assert record.refit.model == "finetune" and record.refit.images == 18
    assert record.refit.epochs == kept  # the head's one epoch, then the stage's
    assert reporter.epochs[-kept:] == [("refit head", 1, 1)] + [  # counted to the kept epoch
        ("refit finetune", e, kept) for e in range(2, kept + 1)]
    assert any("Refitted the 'finetune' model on train + val (18 images" in m
               for m in reporter.messages)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    before = load_keras_file(best_checkpoint(run_dir, "finetune"), "").predict(images, verbose=0)
    after = load_run(run_dir).model.predict(images, verbose=0)
    assert not np.allclose(before, after, atol=1e-4)  # learnt from val too
    assert f"(18 images, {kept} epochs)" in (run_dir / "report.html").read_text()
    assert len(json.loads((run_dir / "history.json").read_text())) == 3  # the run's own


def test_a_refit_that_fails_keeps_the_model_as_trained_on_train(image_folder, tmp_path,
                                                                  monkeypatch):
    import transferkit.training.loop as loop
    from transferkit.commands.finetune import finetune
    from transferkit.errors import TrainingDiverged
    from transferkit.runs.checkpoints import best_checkpoint
    from transferkit.runs.directory import load_keras_file, load_run, read_record
    from transferkit.training.stages import run_stage as real

    def run_stage(inputs, reporter):
        if inputs.plan.name.startswith("refit"):
            raise TrainingDiverged("The loss became nan in epoch 1.")
        return real(inputs, reporter)

    _keep_the_last_candidate(monkeypatch)
    monkeypatch.setattr(loop, "run_stage", run_stage)
    run_dir, reporter = tmp_path / "run", Recorder()
    finetune(FinetuneConfig(adapt=False, patience=0, finetune_epochs=1, refit=True,
                            data=DataConfig(data_dir=image_folder, **TINY),
                            output=run_dir, weights="none", base="tiny"), reporter)
    record = read_record(run_dir)
    assert record.kept_stage == "finetune" and record.refit is None
    assert any("The refit stopped (The loss became nan" in w for w in reporter.warnings)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    kept = load_keras_file(best_checkpoint(run_dir, "finetune"), "").predict(images, verbose=0)
    saved = load_run(run_dir).model.predict(images, verbose=0)
    assert (kept.argmax(1) == saved.argmax(1)).all()  # the kept weights (a temperature aside)
