"""Learning-rate schedules, class weights and best-epoch bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferkit.config import ScheduleConfig
from transferkit.errors import ConfigError
from transferkit.training.stages import best_row, class_weights, learning_rate_at


def rates(name: str, epochs: int = 6, **kwargs) -> list[float]:
    schedule = ScheduleConfig(name=name, **kwargs)
    return [learning_rate_at(schedule, 0.1, e, epochs) for e in range(epochs)]


def test_schedules_give_the_expected_rates():
    assert rates("constant") == pytest.approx([0.1] * 6)
    assert rates("step") == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert rates("step", decay_epochs=3, decay_rate=0.1) == pytest.approx(
        [0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    assert rates("exponential") == pytest.approx([0.1 * 0.9**e for e in range(6)])
    assert rates("inverse-time", decay_rate=1.0) == pytest.approx(
        [0.1 / (1 + e) for e in range(6)])
    assert rates("cosine", epochs=4) == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


def test_warmup_rises_linearly_then_the_schedule_starts():
    assert rates("constant", warmup_epochs=2) == pytest.approx(
        [0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.1])
    warm = rates("cosine", epochs=6, warmup_epochs=2)
    assert warm[2] == pytest.approx(0.1) and warm[3] < warm[2]
    assert rates("constant", epochs=1, warmup_epochs=5) == pytest.approx([0.1])


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="Unknown schedule 'linear'"):
        ScheduleConfig(name="linear")


def test_class_weights_balanced_auto_none():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    balanced = class_weights(labels, 3, "balanced")
    assert balanced == pytest.approx({0: 100 / 180, 1: 100 / 90, 2: 100 / 30})
    assert class_weights(labels, 3, "auto") == balanced  # 6:1 > 1.5:1
    assert class_weights(labels, 3, "none") is None
    assert class_weights(np.array([0] * 12 + [1] * 10), 2, "auto") is None  # 1.2:1


def test_best_row_follows_the_monitor():
    rows = [{"epoch": 1, "val_loss": 0.9, "val_accuracy": 0.7},
            {"epoch": 2, "val_loss": 0.5, "val_accuracy": 0.7},
            {"epoch": 3, "val_loss": 0.6, "val_accuracy": 0.8}]
    assert best_row(rows, "val_loss")["epoch"] == 2
    assert best_row(rows, "val_accuracy")["epoch"] == 3
    assert best_row(rows[:2], "val_accuracy")["epoch"] == 2  # a tie goes to the lower loss
    assert best_row([], "val_loss") is None


def test_configs_are_keyword_only():
    from pathlib import Path

    from transferkit.config import DataConfig, OptimizerConfig

    with pytest.raises(TypeError):
        DataConfig(Path("data"), 224)  # two swapped ints would otherwise go unnoticed
    with pytest.raises(TypeError):
        OptimizerConfig("sgd", 0.9)
    assert DataConfig(data_dir=Path("data"), image_size=224).image_size == 224


def test_every_optimizer_and_schedule_named_in_config_has_a_row():
    from transferkit.config import OPTIMIZERS, SCHEDULES
    from transferkit.training.stages import OPTIMIZERS as BUILDERS
    from transferkit.training.stages import SCHEDULES as RULES

    assert set(BUILDERS) == set(OPTIMIZERS) and set(RULES) == set(SCHEDULES)


def test_an_ema_stage_validates_and_keeps_the_averaged_weights():
    import keras

    from transferkit.config import OptimizerConfig
    from transferkit.reporting import NullReporter
    from transferkit.training.stages import StageInputs, StagePlan, run_stage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    plan = StagePlan("head", "a head", 0, 3, 0.5, ScheduleConfig(name="constant"))
    history: list[dict] = []
    run_stage(StageInputs(model, plan, (x, y), (x, y), steps=4, history=history,
                          optimizer=OptimizerConfig(name="sgd", ema=0.9), batch_size=16),
              NullReporter())
    averages = [v.numpy() for v in model.optimizer._model_variables_moving_average]
    for weight, average in zip(model.get_weights(), averages, strict=True):
        np.testing.assert_allclose(weight, average, rtol=1e-6)
    # The last epoch's val loss was measured on these (averaged) weights, not the raw ones.
    loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert history[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)
    with pytest.raises(ConfigError, match="--ema"):
        OptimizerConfig(ema=1.0)


def test_a_lone_spike_is_not_kept_when_epochs_are_chosen_on_a_window():
    accuracies = [0.91, 0.98, 0.90, 0.95, 0.96, 0.95, 0.93]  # epoch 2: a spike
    rows = [{"epoch": e, "val_accuracy": a, "val_loss": 1 - a}
            for e, a in enumerate(accuracies, start=1)]
    assert best_row(rows, "val_accuracy")["epoch"] == 2
    assert best_row(rows, "val_accuracy", window=3)["epoch"] == 5  # 0.953 around it
    assert best_row(rows, "val_accuracy", window=3, among=4)["epoch"] == 1  # (0.91, 0.98)
    assert best_row(rows[:1], "val_accuracy", window=3)["epoch"] == 1


def test_window_averages_that_differ_by_float_rounding_tie_and_the_val_loss_decides():
    """digits, seed 2: Keras's float32 accuracies of epochs 8-13, as the history holds them.
    Epoch 9's window (0.97, 0.96, 0.95) and epoch 12's (0.96 x3) are both 0.96; the lower val
    loss (epoch 12) wins, not the rounding (epoch 9's average is 2e-8 higher)."""
    import numpy as np

    accuracies = [0.93, 0.97, 0.96, 0.95, 0.96, 0.96, 0.96, 0.95]
    losses = [0.736, 0.723, 0.718, 0.689, 0.673, 0.662, 0.661, 0.669]
    rows = [{"epoch": e, "val_accuracy": float(np.float32(a)), "val_loss": v}
            for e, (a, v) in enumerate(zip(accuracies, losses, strict=True), start=7)]
    assert best_row(rows, "val_accuracy", window=3)["epoch"] == 12
    rows[5]["val_accuracy"] = float(np.float32(0.95))  # then epoch 9's window is higher
    assert best_row(rows, "val_accuracy", window=3)["epoch"] == 9


def test_the_epoch_window_is_one_or_three(tmp_path):
    from transferkit.config import DataConfig, FinetuneConfig

    for window in (0, 2, 5):  # wider windows would need more checkpoints kept back
        with pytest.raises(ConfigError, match="--epoch-window must be 1"):
            FinetuneConfig(data=DataConfig(data_dir=tmp_path), output=tmp_path / "run",
                           epoch_window=window)
