"""finetune --unlabeled: self-training and co-training on a pool, their candidates, and the
refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import Recorder, write_class_folder

from transferkit.config import DataConfig, FinetuneConfig
from transferkit.errors import ArtifactError, ConfigError
from transferkit.runs.directory import PSEUDO_FILE, read_pseudo_labels, save_pseudo_labels
from transferkit.training.candidates import co_trained
from transferkit.training.candidates.co_trained import (
    CO_TRAINED,
    CoTrainedCandidate,
    co_train,
    pixel_view,
)
from transferkit.training.candidates.self_trained import (
    ROUNDS,
    SELF_TRAINED,
    SHARE,
    SelfTrainedCandidate,
    self_train,
)
from transferkit.training.probe import fit_probe


def test_self_training_takes_every_class_evenly_and_leaves_out_unrelated_images():
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:3] * 4
    blob = (lambda c, n: centres[c] + rng.normal(0, .6, (n, 6)))  # noqa: E731
    x_train = np.vstack([blob(c, 3) for c in range(3)])
    y_train = np.repeat(np.arange(3), 3)
    x_val = np.vstack([blob(c, 4) for c in range(3)])
    # a pool where class 0 is five times as common, and 20 images of no class at all
    unrelated = -np.ones((20, 6)) * 4 + rng.normal(0, .3, (20, 6))
    x_pool = np.vstack([blob(0, 100), blob(1, 20), blob(2, 20), unrelated])
    trained = self_train(fit_probe(x_train, y_train, 3), x_train, y_train, x_val, x_pool, 3)
    assert trained.unlike >= 20  # the unrelated ones, at least, are kept out
    answers = trained.probe.probabilities(x_pool[:140]).argmax(axis=1)
    assert (answers == np.repeat([0, 1, 2], [100, 20, 20])).mean() > 0.95
    # evenly per class: class 0's abundance does not make it most of the pseudo-labels
    cap = ROUNDS * int(SHARE * (len(x_pool) - trained.unlike) / 3)
    per_class = trained.per_class(3)
    assert per_class[0] == cap < 100 and max(per_class[1:]) <= 20
    assert sum(per_class) == trained.pseudo_labelled


def test_co_training_learns_from_the_pool_what_both_views_agree_on():
    """Two views that each confuse a different pair of classes: the features mix 1 and 2,
    the pixels 0 and 1. The probe fitted with what both say of the pool does better than the
    probe on the labels alone, and than self-training on the features alone."""
    rng = np.random.default_rng(0)
    k, d = 3, 8
    f_centres = np.array([[4, 0], [0, 1.2], [0, -1.2]])
    p_centres = np.array([[0.6, 0], [-0.6, 0], [0, 4]])

    def draw(n_per_class):
        y = np.repeat(np.arange(k), n_per_class)
        f = np.c_[f_centres[y], np.zeros((len(y), d - 2))] + rng.normal(0, 1, (len(y), d))
        p = np.c_[p_centres[y], np.zeros((len(y), d - 2))] + rng.normal(0, 1, (len(y), d))
        return f, p, y

    f_train, p_train, y_train = draw(4)
    f_val, _, _ = draw(4)
    f_pool, p_pool, y_pool = draw(150)
    f_test, _, y_test = draw(300)
    probe = fit_probe(f_train, y_train, k)
    trained = co_train(probe, (f_train, f_val, f_pool), (p_train, p_pool),
                       pixel_view(k, balanced=False, seed=0), y_train, k)
    assert 0 < trained.pseudo_labelled <= len(f_pool) - trained.unlike

    def accuracy(p):
        return (p.probabilities(f_test).argmax(axis=1) == y_test).mean()
    alone = self_train(probe, f_train, y_train, f_val, f_pool, k).probe  # features only
    assert accuracy(trained.probe) > max(accuracy(probe), accuracy(alone)) + 0.03


@pytest.mark.parametrize(("pixels", "probe", "pool"), [(0.3, 0.8, True), (0.9, 0.8, False)])
def test_the_pixels_co_train_only_where_the_data_checks_found_them_good_enough(
        pixels, probe, pool):
    from types import SimpleNamespace

    run = SimpleNamespace(pool=object() if pool else None, record=SimpleNamespace(
        adaptation=SimpleNamespace(pixel_accuracy=pixels, probe_accuracy=probe)))
    assert CoTrainedCandidate().fit(run, None) is None  # pixels too weak; no pool


def _config(image_folder: Path, out: Path, pool: Path) -> FinetuneConfig:
    return FinetuneConfig(adapt=False, patience=0, combine=False, unlabeled=pool,
                          data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                          output=out, weights="none", base="tiny", finetune_epochs=1)


def test_a_self_trained_probe_that_wins_is_a_candidate_the_run_can_keep(
        image_folder, tmp_path, monkeypatch):
    from transferkit.commands import finetune as recipe
    from transferkit.runs.directory import load_run, read_record
    from transferkit.training.choice import choose

    pool = tmp_path / "pool"
    write_class_folder(pool / "deep", per_class=4, offset=500)

    def wins_over_the_probe(correct):
        if list(correct) == ["probe", SELF_TRAINED]:
            return dataclasses.replace(choose(correct), kept=SELF_TRAINED)
        return choose(correct)

    monkeypatch.setattr(recipe, "choose", wins_over_the_probe)
    result = recipe.finetune(_config(image_folder, tmp_path / "run", pool))
    record = read_record(tmp_path / "run")
    trained = record.candidate(SELF_TRAINED)
    assert trained is not None and trained.won
    assert trained.details["images"] == 12 and trained.details["pool"] == str(pool)
    assert SELF_TRAINED in result.choice.val_correct  # scored beside the probe and stage
    assert load_run(tmp_path / "run").model is not None


def test_a_pool_that_overlaps_the_data_is_refused(image_folder, tmp_path):
    from transferkit.commands.finetune import finetune

    with pytest.raises(ConfigError, match="overlap"):
        finetune(_config(image_folder, tmp_path / "run", image_folder / "circles"))


def test_a_co_trained_probe_is_recorded_and_its_labels_train_the_stage(
        image_folder, tmp_path, monkeypatch):
    from transferkit.commands import finetune as recipe
    from transferkit.runs.directory import load_run, read_record

    pool = tmp_path / "pool"
    write_class_folder(pool / "deep", per_class=12, offset=500)
    monkeypatch.setattr(co_trained, "PIXELS_SUFFICE", 0.0)  # the pixels always a view here
    fit = CoTrainedCandidate.fit

    def every_val_image_right(self, run, probe):  # at least the probe's, on tiny val
        fitted = fit(self, run, probe)
        return dataclasses.replace(fitted, right=np.ones_like(fitted.right))

    monkeypatch.setattr(CoTrainedCandidate, "fit", every_val_image_right)
    monkeypatch.setattr(SelfTrainedCandidate, "fit", lambda self, run, probe: None)
    config = dataclasses.replace(_config(image_folder, tmp_path / "run", pool), adapt=True)
    reporter = Recorder()
    recipe.finetune(config, reporter)
    record = read_record(tmp_path / "run")
    trained = record.candidate(CO_TRAINED)
    assert trained is not None and trained.details["images"] == 36
    taken = trained.details["pseudo_labelled"]
    assert 0 < taken and taken + trained.details["unlike"] <= 36
    assert load_run(tmp_path / "run").model is not None
    # the stage trained on the pool images it labelled, beside train's
    assert trained.details["stages_train_on"] == PSEUDO_FILE
    by, sources, labels = read_pseudo_labels(tmp_path / "run", record.class_names)
    assert by == CO_TRAINED and len(sources) == len(labels) == taken
    assert all(Path(s).is_file() for s in sources)
    assert any(f"and {taken} pool images that '{CO_TRAINED}' labelled" in m
               for m in reporter.messages)
    report = (tmp_path / "run" / "report.html").read_text()
    assert f"on train and the {taken} pool images &#x27;{CO_TRAINED}&#x27; labelled" in report


@pytest.mark.parametrize(("correct", "before", "written"), [
    (5, None, True),  # as many val images right as the probe: its labels go to the stages
    (4, None, False),  # fewer than the probe
    (7, 6, True),  # more than the pool candidate that wrote them before
    (6, 6, False)])  # no more: the earlier (simpler) candidate's labels stay
def test_the_stages_get_the_pool_labels_of_the_best_pool_candidate(tmp_path, correct, before,
                                                                   written):
    from types import SimpleNamespace

    from transferkit.commands.finetune import _hand_pool_labels
    from transferkit.training.candidates import Fitted

    names = ("cat", "dog")
    earlier = [] if before is None else [SimpleNamespace(
        name=SELF_TRAINED, val_correct=before, details={"stages_train_on": PSEUDO_FILE})]
    if before is not None:
        save_pseudo_labels(tmp_path, ["/old.png"], ["cat"], SELF_TRAINED)
    run = SimpleNamespace(
        run_dir=tmp_path, cluster=None, splits=SimpleNamespace(class_names=names),
        record=SimpleNamespace(probe=SimpleNamespace(val_correct=5), candidates=earlier))
    fitted = Fitted(CO_TRAINED, np.ones(correct, bool), "", 0.0, lambda run: None,
                    pseudo=(("/a.png", "/b.png"), np.array([1, 0])))
    assert _hand_pool_labels(run, fitted, correct) == written
    by, sources, _ = read_pseudo_labels(tmp_path, names)
    assert (by == CO_TRAINED) == written and (sources == ("/a.png", "/b.png")) == written


def test_a_damaged_pseudo_labels_file_is_refused(tmp_path):
    save_pseudo_labels(tmp_path, ["/a.png", "/b.png"], ["cat", "dog"], CO_TRAINED)
    assert read_pseudo_labels(tmp_path, ("cat", "dog"))[2].tolist() == [0, 1]
    assert read_pseudo_labels(tmp_path / "none", ("cat",))[0] is None  # a run without
    for damage in ("source,label,candidate\n/a.png,bird,co-trained\n",  # not a class
                   "file,label\n/a.png,cat\n"):  # not the columns
        (tmp_path / PSEUDO_FILE).write_text(damage)
        with pytest.raises(ArtifactError, match="damaged"):
            read_pseudo_labels(tmp_path, ("cat", "dog"))


def test_pool_images_gone_before_the_stages_are_left_out_with_a_warning(tmp_path):
    from types import SimpleNamespace

    from transferkit.training.loop import Training

    here = tmp_path / "here.png"
    here.write_bytes(b"")
    save_pseudo_labels(tmp_path, [str(here), str(tmp_path / "gone.png")], ["dog", "cat"],
                       CO_TRAINED)
    reporter = Recorder()
    train = SimpleNamespace(sources=("/data/train/a.png",), labels=np.array([0]))
    run = SimpleNamespace(run_dir=tmp_path, pseudo=None, reporter=reporter,
                          splits=SimpleNamespace(class_names=("cat", "dog"), train=train))
    sources, labels, by = Training.training_images(run)
    assert sources == ("/data/train/a.png", str(here)) and labels.tolist() == [0, 1]
    assert by == CO_TRAINED
    assert "1 of the 2 pool images" in reporter.warnings[0]
    assert "gone.png" in reporter.warnings[0]
