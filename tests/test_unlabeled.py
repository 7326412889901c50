"""finetune --unlabeled: self-training on a pool, its candidate, and its refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import write_class_folder

from transferkit.config import DataConfig, FinetuneConfig
from transferkit.errors import ConfigError
from transferkit.training.candidates.self_trained import ROUNDS, SELF_TRAINED, SHARE, self_train
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
    assert trained.per_class[0] == cap < 100 and max(trained.per_class[1:]) <= 20
    assert sum(trained.per_class) == trained.pseudo_labelled


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
