"""Staged finetune: checkpoints, signals, and resuming in the right stage."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETUP, Recorder

from transferkit.bases import get_base
from transferkit.commands.finetune import finetune, resume_finetune
from transferkit.config import DataConfig, FinetuneConfig
from transferkit.errors import ArtifactError, RunInterrupted
from transferkit.reporting import NullReporter
from transferkit.runs.directory import load_run
from transferkit.training.prepare import prepare


class SignalAt(NullReporter):
    """Sends `signum` to this process when training reaches (stage, epoch)."""

    def __init__(self, stage: str, epoch: int, signum: int = signal.SIGINT) -> None:
        self.at, self.signum = (stage, epoch), signum

    def epoch_ended(self, stage, epoch, epochs, metrics):
        if (stage, epoch) == self.at:
            os.kill(os.getpid(), self.signum)


def _config(data: Path, out: Path) -> FinetuneConfig:
    return FinetuneConfig(adapt=False, patience=0,
                          data=DataConfig(data_dir=data, image_size=32, batch_size=8), output=out,
                          weights="none", base="tiny", epochs=3, finetune_epochs=2,
                          unfreeze_blocks=2)


@pytest.mark.parametrize(("stage", "epoch", "signum"), [("head", 2, signal.SIGINT),
                                                        ("finetune", 4, signal.SIGTERM)])
def test_interrupted_run_resumes_to_the_same_kind_of_run(image_folder, tmp_path, stage, epoch,
                                                         signum):
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        finetune(_config(image_folder, run_dir), SignalAt(stage, epoch, signum))
    assert info.value.exit_code == 128 + signum and "--resume" in str(info.value)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["stopped"] == {"stage": stage, "epoch": epoch, "phase": "training",
                                 "signal": signal.Signals(signum).name}
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == (stage, epoch)
    assert (run_dir / "checkpoints" / "best-head.keras").is_file()
    assert not (run_dir / "model.keras").exists()
    with pytest.raises(ArtifactError, match="unfinished run"):
        load_run(run_dir)

    result = resume_finetune(run_dir)
    assert [s.name for s in result.stages] == ["head", "finetune"]
    assert [s.epochs for s in result.stages] == [3, 2]
    assert result.stages[1].trainable_params > result.stages[0].trainable_params
    history = json.loads((run_dir / "history.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in history] == [
        ("head", 1), ("head", 2), ("head", 3), ("finetune", 4), ("finetune", 5)]
    # stage 1 keeps its rate; stage 2's cosine schedule carries on across the interruption
    assert [r["learning_rate"] for r in history] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-4, 0.5e-4], rel=1e-5)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["stopped"] is None
    assert load_run(run_dir).class_names == ("circles", "squares", "stripes")
    assert not (run_dir / "checkpoints" / "last.keras").exists()
    assert (run_dir / "checkpoints" / "best-finetune.keras").is_file()


def test_resume_restores_frozen_layers_and_optimizer_state(image_folder, tmp_path):
    from transferkit.runs.checkpoints import load_checkpoint

    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        finetune(_config(image_folder, run_dir), SignalAt("finetune", 4))
    model, state = load_checkpoint(run_dir, ["head", "finetune"])
    assert int(model.optimizer.iterations) == 2  # one finetune epoch of 2 batches (12 images)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)
    base = model.get_layer("features").get_layer("tiny")
    # the top 2 of the tiny base's 3 blocks are unfrozen, their BatchNorm stays frozen
    assert base.get_layer("block3_conv").trainable and base.get_layer("block2_conv").trainable
    assert not base.get_layer("block1_conv").trainable
    assert not base.get_layer("block3_bn").trainable


def test_finished_or_foreign_runs_are_not_resumed(trained_run, tmp_path):
    with pytest.raises(ArtifactError, match="nothing to resume"):
        resume_finetune(trained_run)
    with pytest.raises(ArtifactError, match="does not exist"):
        resume_finetune(tmp_path / "missing")


class SignalAtFirstBatch(NullReporter):
    """Sends SIGINT once, after the first training batch."""

    def __init__(self) -> None:
        self.armed = False

    def stage_started(self, stage) -> None:
        self.armed = True

    def advance(self, steps: int = 1) -> None:
        if self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGINT)


def test_run_stopped_before_its_first_checkpoint(image_folder, tmp_path):
    import keras

    from transferkit.runs.directory import read_record

    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="before the first epoch ended") as stopped:
        finetune(_config(image_folder, run_dir), SignalAtFirstBatch())
    assert not (run_dir / "checkpoints" / "last.keras").exists()
    probe = run_dir / "checkpoints" / "best-probe.keras"  # what it already had is kept
    assert f"is a usable plain Keras model: {probe}" in str(stopped.value)
    assert keras.saving.load_model(probe, safe_mode=True).predict(
        np.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 3)
    # as a kill -9 leaves it: still 'running', no process holding it, no checkpoint
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "status": "running"}))
    result = resume_finetune(run_dir)  # starts it again, with its saved settings
    assert result.run_dir == run_dir and read_record(run_dir).status == "complete"


def test_rollback_when_finetuning_does_worse(image_folder, tmp_path):
    import numpy as np

    from transferkit.runs.checkpoints import best_checkpoint
    from transferkit.runs.directory import read_record

    run_dir = tmp_path / "run"
    config = FinetuneConfig(adapt=False, patience=0,
                            data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                            output=run_dir, weights="none", base="tiny", epochs=2,
                            finetune_epochs=2,
                            finetune_lr=1e3, unfreeze_blocks=3,  # a rate that wrecks the base
                            monitor="val_loss",
                            dense_units=16,  # a hidden layer: the probe is a model of its own
                            refit=False)  # so the saved model is the kept checkpoint's
    result = finetune(config)
    assert result.kept_stage in ("probe", "head")
    record = read_record(run_dir)
    assert record.rollback and record.kept_stage == result.kept_stage
    assert record.choice.kept == result.kept_stage
    import keras

    from transferkit.calibration import scale

    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    saved = load_run(run_dir).model.predict(images, verbose=0)
    kept = keras.saving.load_model(best_checkpoint(run_dir, result.kept_stage), compile=False)
    # the saved model is the kept candidate with its calibration temperature folded in
    np.testing.assert_allclose(saved, scale(kept.predict(images, verbose=0),
                                            record.calibration.temperature), atol=1e-5)


def test_same_seed_same_run(image_folder, tmp_path):
    def history(name: str) -> list[dict]:
        config = FinetuneConfig(adapt=False, patience=0,
                                data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8,
                                                seed=7),
                                output=tmp_path / name, weights="none", base="tiny", epochs=2,
                                finetune_epochs=1)
        return list(finetune(config).history)

    first, second = history("a"), history("b")
    for a, b in zip(first, second, strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_no_augment_trains_stage_1_on_cached_features(image_folder, tmp_path):
    import dataclasses

    from transferkit.config import AugmentConfig
    from transferkit.runs.checkpoints import load_checkpoint

    config = dataclasses.replace(_config(image_folder, tmp_path / "run"),
                                 augment=AugmentConfig(enabled=False))
    with pytest.raises(RunInterrupted):
        finetune(config, SignalAt("head", 2))
    from transferkit.training.loop import _restore_head_state

    model, state = load_checkpoint(tmp_path / "run", ["head", "finetune"])
    assert state["head_only"]  # each epoch wrote the head alone, beside the stage's start
    _restore_head_state(model, tmp_path / "run")
    assert int(model.optimizer.iterations) == 4  # the head's Adam state travels with the run
    # The checkpoint holds the trained head over the untouched base, though only the head's
    # weights were kept in memory between epochs.
    initial = prepare(dataclasses.replace(config, output=None), get_base(config.base),
                      NullReporter()).model
    for name, changed in (("features", False), ("head", True)):
        pairs = zip(model.get_layer(name).get_weights(), initial.get_layer(name).get_weights(),
                    strict=True)
        assert any(not np.array_equal(a, b) for a, b in pairs) == changed, name
    recorder = Recorder()
    result = resume_finetune(tmp_path / "run", recorder)
    assert [(s.name, s.epochs) for s in result.stages] == [("head", 3), ("finetune", 2)]
    assert any("Frozen-base features" in m and "0 images computed" in m
               for m in recorder.messages)  # the first attempt cached them
    again = Recorder()
    finetune(dataclasses.replace(config, output=tmp_path / "run2"), again)
    assert any("0 images computed, 18 from the cache" in m for m in again.messages)


def test_an_ignored_sigint_stays_ignored(image_folder, tmp_path):
    from transferkit.training.signals import StopOnSignal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a nohup'd job; the fixture restores
    with StopOnSignal(NullReporter()) as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._request
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_loss_that_turns_nan_stops_the_run_and_saves_no_model(image_folder, tmp_path):
    """A penalty that overflows float32 makes the loss NaN: the run stops in its first epoch
    with exit 1, says which epoch and what to do, and leaves no model."""
    from typer.testing import CliRunner

    from transferkit.cli.app import app

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", str(image_folder), "-o", str(run_dir),
                                      "--weights", "none", "--base", "tiny", "--image-size", "32",
                                      "--batch-size", "8", "--epochs", "2", "--l2", "1e38",
                                      "--finetune-epochs", "0", "--no-augment",
                                      "--patience", "0"])
    assert result.exit_code == 1, result.output
    said = " ".join(result.stderr.split())
    assert "in epoch 1 (stage 'head'" in said and "Lower --learning-rate" in said, said
    assert "Traceback" not in result.output
    assert not (run_dir / "model.keras").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "epoch 1" in record["failure"]
    again = CliRunner().invoke(app, ["finetune", str(image_folder), "-o", str(run_dir)])
    assert again.exit_code == 1 and "holds a failed run" in " ".join(again.stderr.split())


def test_damaged_base_weights_stop_the_run_before_training(image_folder, tmp_path):
    """A base whose weights hold NaN gives NaN features: the probe refuses them with exit 1,
    names the weights, and the run is recorded as failed."""
    import numpy as np
    from typer.testing import CliRunner

    from transferkit.bases import get_base
    from transferkit.cli.app import app

    base = get_base("efficientnet_lite0").build((32, 32, 3))
    base.set_weights([np.full(w.shape, np.nan, w.dtype) for w in base.get_weights()])
    weights = tmp_path / "nan.weights.h5"
    base.save_weights(weights)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", str(image_folder), "-o", str(run_dir),
                                      "--weights", str(weights), "--image-size", "32",
                                      "--batch-size", "8", "--finetune-epochs", "0"])
    assert result.exit_code == 1, result.output
    said = " ".join(result.stderr.split())
    assert "non-finite features" in said and "nan.weights.h5" in said, said
    assert "Traceback" not in result.output and not (run_dir / "model.keras").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("option", ["--learning-rate", "--dropout", "--finetune-lr",
                                    "--momentum", "--val-split"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_options_are_usage_errors(image_folder, tmp_path, option, value):
    from typer.testing import CliRunner

    from transferkit.cli.app import app

    result = CliRunner().invoke(app, ["finetune", str(image_folder), "-o",
                                      str(tmp_path / "run"), option, value])
    assert result.exit_code == 2, result.output
    assert "must be" in result.stderr and not (tmp_path / "run").exists()


KILLABLE = TINY_SETUP + """
import sys
from pathlib import Path
from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig
from transferkit.commands.finetune import finetune
finetune(FinetuneConfig(adapt=False, patience=0,
                        data=DataConfig(data_dir=Path(sys.argv[1]), image_size=32, batch_size=4),
                        output=Path(sys.argv[2]), weights="none", base="tiny", epochs=400,
                        finetune_epochs=2, augment=AugmentConfig(enabled=sys.argv[3] == "1")))
"""


@pytest.mark.parametrize("augment", [False, True], ids=["head-on-features", "through-base"])
def test_kill_9_loses_at_most_the_epoch_in_progress(image_folder, tmp_path, augment):
    import os
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    state = run_dir / "checkpoints" / "state.json"
    worker = subprocess.Popen([sys.executable, "-c", KILLABLE, str(image_folder), str(run_dir),
                               "1" if augment else "0"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                if json.loads(state.read_text())["epoch"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        worker.kill()
    saved = json.loads(state.read_text())["epoch"]
    assert saved >= 3
    history_before = json.loads(state.read_text())["history"]
    assert [r["epoch"] for r in history_before] == list(range(1, saved + 1))  # none skipped

    from transferkit.config import FinetuneConfig
    from transferkit.runs.directory import read_record

    record = read_record(run_dir, finished=False)
    assert record.status == "running"
    shortened = record.replace(config=dataclasses.replace(record.config, epochs=saved + 2))
    from transferkit.runs.directory import save_record

    save_record(run_dir, shortened)  # finish quickly: two more head epochs, then stage 2
    assert isinstance(shortened.config, FinetuneConfig)
    result = resume_finetune(run_dir)
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history][:saved] == list(range(1, saved + 1))
    assert [r["epoch"] for r in history if r["stage"] == "head"] == list(range(1, saved + 3))
    assert [s.name for s in result.stages] == ["head", "finetune"]


def test_stages_no_candidate_could_be_kept_by_are_skipped(image_folder, tmp_path):
    """With 3 val images, a probe right on 2 or 3 could only be beaten by 4 or 5 right: no
    stage can be kept, so none runs (--patience 0 runs them anyway, as the other tests do)."""
    from conftest import Recorder

    from transferkit.runs.directory import read_record

    reporter = Recorder()
    config = FinetuneConfig(adapt=False, data=DataConfig(data_dir=image_folder, image_size=32,
                                                         batch_size=8),
                            output=tmp_path / "run", weights="none", base="tiny", epochs=1,
                            finetune_epochs=2)
    finetune(config, reporter)
    record = read_record(tmp_path / "run")
    assert record.stages == () and record.kept_stage == "probe"
    assert any("and any after it skipped" in m and "at least 2 more" in m
               for m in reporter.messages)


def test_a_stage_not_on_course_to_be_kept_stops_once_judged():
    import keras

    import transferkit.training.callbacks as callbacks

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    history: list[dict] = []
    tracker = callbacks.EpochTracker("finetune", "val_accuracy", history)
    monitor = callbacks.OffCourseStopping(tracker, 5, needed=8, val_images=10, last_epoch=10,
                                          judge_after=3)
    listed = keras.callbacks.CallbackList([tracker, monitor], model=model)

    def after(accuracies: tuple[float, ...]) -> bool:
        history[:] = [{"stage": "finetune", "epoch": e, "val_accuracy": a, "val_loss": 1 - a}
                      for e, a in enumerate(accuracies, start=1)]
        model.stop_training = False
        listed.on_epoch_end(len(accuracies) - 1)
        return model.stop_training

    assert not after((0.5, 0.6))  # not yet judged: 3 epochs in
    assert not after((0.3, 0.5, 0.7))  # 7 of 10, 8 needed, but gaining 2 an epoch
    assert not after((0.6, 0.7, 0.7))  # +1 in 2 epochs: 10.5 by epoch 10, so on course
    assert after((0.7, 0.7, 0.7))  # flat at 7 of 10, 8 needed: stopped
    assert not after((0.7, 0.7, 0.8))  # 8 of 10 reached: kept going
    monitor.judge_after = 0  # --patience 0: never judged
    assert not after((0.7, 0.7, 0.7))


def test_the_tracker_settles_an_epoch_once_its_window_is_complete():
    import keras

    import transferkit.training.callbacks as callbacks

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    history: list[dict] = []
    tracker = callbacks.EpochTracker("finetune", "val_accuracy", history, window=3)
    seen = []
    for epoch, accuracy in enumerate((0.5, 0.9, 0.6, 0.8, 0.85), start=1):
        history.append({"stage": "finetune", "epoch": epoch, "val_accuracy": accuracy,
                        "val_loss": 1 - accuracy})
        tracker.set_model(model)
        tracker.on_epoch_end(epoch - 1)
        seen.append((tracker.improved, tracker.best and tracker.best["epoch"]))
    # epoch 1 settles after epoch 2 (0.7), 2 after 3 (0.667 < 0.7), 3 after 4 (0.767), 4
    # after 5 (0.75); the last, on its own shorter window (0.825), is settled by finish
    assert seen == [(False, None), (True, 1), (False, 1), (True, 3), (False, 3)]
    assert tracker.finish() and tracker.best["epoch"] == 5


@pytest.mark.parametrize("accuracies,kept", [
    ((0.5, 0.9, 0.8, 0.5, 0.4), 2),  # settled one epoch later: the checkpoint before the last
    ((0.5, 0.6, 0.7, 0.9), 4),  # the last epoch, on its shorter window, at the stage's end
    ((0.9,), 1),  # a stage of one epoch
])
def test_the_best_checkpoint_holds_the_epoch_the_window_chose(tmp_path, accuracies, kept):
    import keras

    import transferkit.training.callbacks as callbacks
    from transferkit.runs.checkpoints import best_checkpoint
    from transferkit.training.stages import best_row

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    history: list[dict] = []
    tracker = callbacks.EpochTracker("finetune", "val_accuracy", history, window=3)
    checkpointer = callbacks.Checkpointer(tracker, tmp_path, model)
    for callback in (tracker, checkpointer):
        callback.set_model(model)
    for epoch, accuracy in enumerate(accuracies, start=1):
        model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
        history.append({"stage": "finetune", "epoch": epoch, "val_accuracy": accuracy,
                        "val_loss": 1 - accuracy})
        tracker.on_epoch_end(epoch - 1)
        checkpointer.on_epoch_end(epoch - 1)
    checkpointer.finish()
    assert best_row(history, "val_accuracy", 3)["epoch"] == kept
    model.load_weights(best_checkpoint(tmp_path, "finetune"))
    assert all(np.all(w == kept) for w in model.get_weights())


def test_the_kept_epoch_of_a_windowed_choice_is_the_model_saved(image_folder, tmp_path):
    """The best checkpoint holds the chosen epoch's weights, whether it was the epoch before
    the last (the previous checkpoint, copied) or the last one."""
    import keras

    from transferkit.runs.checkpoints import best_checkpoint
    from transferkit.runs.directory import read_record

    config = FinetuneConfig(adapt=False, patience=0, epoch_window=3,
                            data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8,
                                            val_split=0.5),
                            output=tmp_path / "run", weights="none", base="tiny", epochs=1,
                            finetune_epochs=3)
    result = finetune(config)
    record = read_record(tmp_path / "run")
    rows = [r for r in result.history if r["stage"] == "finetune"]
    if not rows:
        pytest.skip("the stage was skipped: no room beside the probe on this folder")
    from transferkit.training.stages import best_row

    kept = best_row(rows, "val_accuracy", 3)
    stage = next(s for s in record.stages if s.name == "finetune")
    assert stage.best_epoch == kept["epoch"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert f"best epoch {kept['epoch']} (on the mean of the 3 epochs around each)" in page
    saved = keras.saving.load_model(best_checkpoint(tmp_path / "run", "finetune"),
                                    safe_mode=True, compile=False)
    assert saved is not None


def test_label_smoothing_mixup_and_cutmix_train_on_one_hot_rows(image_folder, tmp_path):
    """On images (head and fine-tuning) and on cached features (a head without augmentation)."""
    from transferkit.config import AugmentConfig
    from transferkit.runs.directory import load_run, read_record

    for name, augment in (("images", AugmentConfig(mixup=0.2, cutmix=1.0)),
                          ("features", AugmentConfig(enabled=False))):
        config = FinetuneConfig(adapt=False, patience=0, label_smoothing=0.1, augment=augment,
                                data=DataConfig(data_dir=image_folder, image_size=32,
                                                batch_size=8),
                                output=tmp_path / name, weights="none", base="tiny", epochs=1,
                                finetune_epochs=1 if name == "images" else 0)
        result = finetune(config)
        assert result.history and all(np.isfinite(r["loss"]) and 0 <= r["val_accuracy"] <= 1
                                      for r in result.history)
        assert load_run(tmp_path / name).model.output_shape == (None, 3)
        assert read_record(tmp_path / name).plan.label_smoothing == 0.1  # the plan carries it
        assert "label smoothing 0.1, best epoch" in (tmp_path / name / "report.html").read_text()


def test_a_run_whose_stages_are_skipped_runs_no_data_checks(image_folder, tmp_path):
    from transferkit.runs.directory import read_record

    config = FinetuneConfig(data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                            output=tmp_path / "run", weights="none", base="tiny",
                            finetune_epochs=2)  # 3 val images: no room beside the probe
    finetune(config)
    record = read_record(tmp_path / "run")
    assert record.stages == () and record.adaptation is None and record.plan is not None
