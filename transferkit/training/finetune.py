"""The staged `finetune`: a new head on the frozen base first (so large random-head gradients
never reach pretrained weights), then the top blocks at a lower rate.

Each stage stops early when the monitored validation metric stops improving and ends on its
best epoch; when fine-tuning does not beat the head stage, the head stage's model is kept.
Every completed epoch is checkpointed with its optimizer state; SIGINT/SIGTERM stop at the
next batch boundary, and `resume_finetune` carries on from the last checkpoint in the right
stage, with the right frozen layers, optimizer state, learning rate and epoch.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import keras
import numpy as np

from transferkit.augment import build_augmentation
from transferkit.bases import BaseSpec, get_base
from transferkit.calibration import (
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    log_loss,
    scale,
)
from transferkit.config import FinetuneConfig
from transferkit.data.folders import DataSplits, splits_from_table
from transferkit.data.pipeline import build_dataset
from transferkit.devices import build_strategy, precision_policy
from transferkit.errors import ArtifactError, RunInterrupted, TrainingDiverged
from transferkit.features import FeatureExtractor
from transferkit.files import save_figure
from transferkit.freezing import count_params, freeze_base, unfreeze_top_blocks
from transferkit.inference import predict_batches
from transferkit.metrics import classification_metrics
from transferkit.model import PREDICTIONS, build_classifier, build_head
from transferkit.plots import plot_curves, plot_lr_find
from transferkit.reporting import NullReporter, Reporter
from transferkit.run_report import Evaluated, write_run_report
from transferkit.runs import (
    COMPLETE,
    CURVES_FILE,
    FAILED,
    INTERRUPTED,
    LR_FIND_FILE,
    REPORT_FILE,
    RUNNING,
    TENSORBOARD_DIR,
    Calibration,
    Choice,
    Compute,
    ProbeRecord,
    RunRecord,
    Score,
    StageResult,
    Stopped,
    best_checkpoint,
    clear_run,
    keep_last_as_best,
    load_checkpoint,
    load_head_state,
    read_record,
    read_splits,
    restore_best,
    run_lock,
    save_best,
    save_checkpoint,
    save_head_state,
    save_record,
    save_run,
    save_splits,
)
from transferkit.training.adaptation import apply as apply_adaptation
from transferkit.training.adaptation import assess, standing
from transferkit.training.adaptation import describe as describe_adaptation
from transferkit.training.checks import lr_find
from transferkit.training.choice import choose
from transferkit.training.choice import describe as describe_choice
from transferkit.training.prepare import Prepared, data_summary, prepare, report_data
from transferkit.training.probe import fit_probe
from transferkit.training.stages import (
    StagePlan,
    best_row,
    class_weights,
    compile_model,
    improves,
    run_stage,
    stage_result,
)

PROBE, HEAD, FINETUNE = "probe", "head", "finetune"  # the candidates, simplest first


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask training to stop at the next batch boundary
    instead of killing it mid-write. A second Ctrl-C interrupts at once."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. nohup'd: keep it so
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.reporter.warning(f"{signal.Signals(signum).name} received: stopping at the end of "
                              f"the current batch (Ctrl-C again to abort at once).")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Raises _Stop when a stop was requested (used as a callback at every boundary)."""
        if self.signum is not None:
            raise _Stop(self.signum)

    def callback(self) -> keras.callbacks.Callback:
        return keras.callbacks.LambdaCallback(on_train_batch_end=self.check,
                                              on_test_batch_end=self.check,
                                              on_epoch_end=self.check)


class _Stop(Exception):
    """Raised inside fit() to leave it at a batch boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path
    class_names: tuple[str, ...]
    stages: tuple[StageResult, ...]
    kept_stage: str  # whose weights the saved model has
    history: tuple[dict[str, Any], ...]
    scores: tuple[Score, ...]  # of the kept model: val, and test when DATA has one
    choice: Choice
    calibration: Calibration
    test_probabilities: np.ndarray | None  # the kept model's, calibrated, on DATA/test


def plan_stages(config: FinetuneConfig, spec: BaseSpec) -> list[StagePlan]:
    """The epoch-based stages after the probe: the head on the frozen base (when --epochs),
    then, unless --finetune-epochs 0, the top blocks."""
    stages = []
    if config.epochs:
        stages.append(StagePlan(HEAD, f"train the head on the frozen {spec.name} base", 0,
                                config.epochs, config.learning_rate, config.schedule))
    if config.finetune_epochs:
        top = spec.blocks[-config.resolved_unfreeze_blocks:]
        stages.append(StagePlan(
            FINETUNE, f"fine-tune block{'s' if len(top) > 1 else ''} {', '.join(top)} "
                      f"(BatchNorm {'trainable' if config.train_batchnorm else 'frozen'})",
            config.epochs, config.epochs + config.finetune_epochs,
            config.resolved_finetune_lr, config.finetune_schedule, "--finetune-lr"))
    return stages


def finetune(config: FinetuneConfig, reporter: Reporter | None = None,
             splits: DataSplits | None = None) -> FinetuneResult:
    """Trains a classifier on `config.data` (split as `splits` when given: cv's folds) and
    writes the run directory.

    Raises:
        TransferkitError: bad data, options, weights, or an existing output (all checked
            before anything is written); RunInterrupted when stopped by a signal.
    """
    reporter = reporter or NullReporter()
    if config.output is None:
        raise ArtifactError("finetune needs a run directory: pass -o RUN.")
    with run_lock(config.output):
        return _start(config, reporter, splits)


def _start(config: FinetuneConfig, reporter: Reporter,
           splits: DataSplits | None) -> FinetuneResult:
    """finetune, once this process holds the run directory."""
    assert config.output is not None
    started = time.perf_counter()
    prepared = prepare(config, reporter, splits)
    found = lr_find(config, prepared, reporter) if config.lr_find else None
    splits = prepared.splits
    weights = class_weights(splits.train.labels, len(splits.class_names), config.class_weight)
    # The record keeps the resolved config: the image size used, lr-find's rate.
    resolved = dataclasses.replace(
        config, data=dataclasses.replace(config.data, image_size=prepared.image_size),
        learning_rate=config.learning_rate if found is None else found.suggestion)
    record = RunRecord(
        command="finetune", config=resolved, base=prepared.spec.name,
        base_layer=prepared.base.name,
        preprocessing=prepared.spec.preprocessing, class_names=splits.class_names,
        class_weights=None if weights is None else {
            splits.class_names[i]: w for i, w in weights.items()},
        compute=Compute(precision=prepared.precision, jit=config.compute.jit,
                        strategy=type(prepared.strategy).__name__,
                        replicas=prepared.strategy.num_replicas_in_sync),
        data=data_summary(splits), lr_find=found, status=RUNNING)
    if config.overwrite:
        clear_run(config.output)
    save_splits(config.output, splits.rows())
    record = save_record(config.output, record)
    if found is not None:
        save_figure(config.output / LR_FIND_FILE, plot_lr_find(found))
    record, x_train = _probe(record, prepared, reporter, started)
    # The checks decide stage 2's depth and the flips of any stage that augments; a run of
    # the probe alone needs neither.
    if config.adapt and (config.finetune_epochs or (config.epochs and config.augment.enabled)):
        record = _adapt(record, prepared, x_train, reporter)
    return _train(record, prepared.spec, splits, prepared.model, prepared.base, [], 0,
                  reporter, prepared.strategy)


def resume_finetune(run_dir: Path, reporter: Reporter | None = None) -> FinetuneResult:
    """Continues an interrupted `finetune` from its last completed epoch.

    Raises:
        ArtifactError: `run_dir` is not an unfinished run, or has no checkpoint yet.
    """
    reporter = reporter or NullReporter()
    read_record(run_dir, finished=False)  # a missing folder is an error, not a folder to make
    with run_lock(run_dir):
        return _resume(run_dir, reporter)


def _resume(run_dir: Path, reporter: Reporter) -> FinetuneResult:
    """resume_finetune, once this process holds the run directory."""
    record = read_record(run_dir, finished=False)
    if record.status == FAILED:
        raise ArtifactError(f"'{run_dir}' holds a failed run, which would fail again the same "
                            f"way: {record.failure}")
    if record.command != "finetune" or record.status == COMPLETE:
        raise ArtifactError(f"'{run_dir}' is not an unfinished finetune run (status "
                            f"{record.status!r}); there is nothing to resume.")
    assert isinstance(record.config, FinetuneConfig)
    record = record.replace(config=dataclasses.replace(record.config, output=run_dir))
    spec = get_base(record.base)
    strategy = build_strategy(record.config.compute.strategy)
    with strategy.scope():  # layers keep the dtype policies they were saved with
        model, state = load_checkpoint(run_dir, [plan.name for plan in plan_stages(
            record.config, spec)])
    rows = read_splits(run_dir, record.class_names)
    splits = splits_from_table(record.data_dir, record.class_names, rows, reporter)
    report_data(splits, reporter)
    reporter.info(f"Resuming stage '{state['stage']}' after epoch {state['epoch']}.")
    keras.utils.set_random_seed(record.config.data.seed + int(state["epoch"]))
    base = model.get_layer("features").get_layer(record.base_layer)
    best = _restore_head_state(model, run_dir) if state.get("head_only") else None
    return _train(record, spec, splits, model, base, list(state["history"]),
                  int(state["epoch"]), reporter, strategy, resumed_stage=state["stage"],
                  resumed_best=best)


def _probe(record: RunRecord, prepared: Prepared, reporter: Reporter,
           started: float) -> tuple[RunRecord, np.ndarray]:
    """Fits the linear probe on frozen features of train, says its val score (the bar to
    beat) and saves it as the first candidate model, the first usable one. A linear head
    starts from its weights (LP-FT); a head with a hidden layer gets a probe model of its
    own. Returns the record and the training features."""
    config = record.config
    assert isinstance(config, FinetuneConfig) and config.output is not None
    splits, model = prepared.splits, prepared.model
    (x_train, y_train), (x_val, y_val) = _frozen_features(
        config, prepared.spec, splits, model.get_layer("features"), prepared.image_size,
        record.compute.precision, reporter)
    broken = int((~np.isfinite(x_train)).any(axis=1).sum() + (~np.isfinite(x_val)).any(
        axis=1).sum())
    if broken:
        failure = (f"The frozen {prepared.spec.name} base gives non-finite features (NaN or "
                   f"inf) for {broken} of {len(x_train) + len(x_val)} images, so nothing can "
                   f"be trained on them: its weights ('{config.weights}') are damaged, or were "
                   f"saved from a model whose training diverged. Use other weights (e.g. "
                   f"--weights imagenet).")
        save_record(config.output, record.replace(status=FAILED, failure=failure))
        raise TrainingDiverged(failure)
    probe = fit_probe(x_train, y_train, len(splits.class_names),
                      balanced=record.class_weights is not None, seed=config.data.seed)
    correct = int((probe.probabilities(x_val).argmax(axis=1) == y_val).sum())
    how = (f"C={probe.c:g} by {probe.folds}-fold cross-validation on train" if probe.folds
           else f"C={probe.c:g}: a class has one training image, too few to cross-validate")
    reporter.info(f"Linear probe ({how}; {probe.seconds:.1f} s): "
                  f"{Score.of('val', correct, len(y_val), chose=False).describe()}. "
                  f"The kept model must beat it by more than noise.")
    with prepared.strategy.scope(), precision_policy(record.compute.precision):
        candidate = model
        if config.dense_units:
            candidate = build_classifier(model.get_layer("features"), build_head(
                x_train.shape[1], len(splits.class_names)))
        candidate.get_layer("head").get_layer(PREDICTIONS).set_weights(
            [probe.kernel, probe.bias])
    save_best(config.output, candidate, PROBE)
    ready = time.perf_counter() - started
    reporter.info(f"First usable model (the probe) saved after {ready:.0f} s.")
    return save_record(config.output, record.replace(probe=ProbeRecord(
        c=probe.c, folds=probe.folds, fit_seconds=round(probe.seconds, 3),
        ready_after=round(ready, 3)))), x_train


def _adapt(record: RunRecord, prepared: Prepared, x_train: np.ndarray,
           reporter: Reporter) -> RunRecord:
    """Decides from the training split how deep to fine-tune and whether flips keep labels
    (training.adaptation), and writes the decisions into the record's resolved config, so
    that a resumed run trains the same way."""
    config = record.config
    assert isinstance(config, FinetuneConfig) and config.output is not None and record.probe
    train = prepared.splits.train
    found = assess(train.sources, train.labels, x_train, record.probe.c,
                   balanced=record.class_weights is not None, seed=config.data.seed)
    if found is None:
        reporter.info("Too few training images per class to check the data; fine-tuning the "
                      "top blocks with the augmentation as given.")
        return record
    stands = standing(config, found)
    reporter.info(f"Data checks: {describe_adaptation(found)}" + (
        f"\nGiven and kept over that: {', '.join(stands)}." if stands else ""))
    return save_record(config.output, record.replace(
        adaptation=found, config=apply_adaptation(config, found, len(prepared.spec.blocks))))


class StageMonitor(keras.callbacks.Callback):
    """After each epoch: checkpoint it, so that a crash or kill -9 loses at most the epoch in
    progress; keep the stage's best weights; and stop the stage once `patience` epochs pass
    without improvement. Driven by the history rows, so it carries on correctly after a resume.

    Training through the base, each epoch saves the classifier (0.50 s for Lite0 at 224 px on
    2 CPU cores, fsync included; such an epoch takes many seconds). A head trained on cached
    features changes only the head, and its epochs take milliseconds: each writes the head's
    weights, the best ones so far and the optimizer state (4 ms, 0.2 MB), beside the
    classifier saved once when the stage started; `finish` writes the full checkpoints once
    at the stage's end.
    """

    def __init__(self, config: FinetuneConfig, plan: StagePlan, classifier: keras.Model,
                 history: list[dict[str, Any]], best: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.config, self.plan, self.classifier, self.history = config, plan, classifier, history
        self.best = best  # head-only: the best epoch's head weights so far
        self.state: dict[str, Any] | None = None  # of the last completed epoch
        assert config.output is not None
        self.run_dir: Path = config.output

    @property
    def head_only(self) -> bool:
        """Whether the model being fitted is the head alone, on cached features."""
        return self.model is not self.classifier

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rows = [r for r in self.history if r["stage"] == self.plan.name]
        improved = improves(self.config.monitor, rows[-1],
                            best_row(rows[:-1], self.config.monitor))
        self.state = {"stage": self.plan.name, "epoch": epoch + 1, "history": self.history}
        if self.head_only:
            weights = self.model.get_weights()
            if improved:
                self.best = weights
            optimizer = [v.numpy() for v in self.classifier.optimizer.variables]
            save_head_state(self.run_dir, weights, self.best, optimizer, self.state)
        else:
            save_checkpoint(self.run_dir, self.classifier, self.state)
            if improved:  # the checkpoint just written is the best: copied, not saved again
                keep_last_as_best(self.run_dir, self.plan.name)
        best = best_row(rows, self.config.monitor)
        patience = self.config.patience
        if patience and best is not None and rows[-1]["epoch"] - best["epoch"] >= patience:
            self.model.stop_training = True  # the model being fitted: classifier or head

    def finish(self) -> None:
        """At the stage's end, head-only: the best model and the last epoch's, in full."""
        if self.state is None or not self.head_only:
            return
        last = self.model.get_weights()
        if self.best is not None:
            self.model.set_weights(self.best)
            save_best(self.run_dir, self.classifier, self.plan.name)
            self.model.set_weights(last)
        save_checkpoint(self.run_dir, self.classifier, self.state)


def _restore_head_state(model: keras.Model, run_dir: Path) -> list[np.ndarray] | None:
    """Puts a head-only checkpoint's weights and optimizer state into the classifier saved
    when its stage started; returns the stage's best head weights so far."""
    head = model.get_layer("head")
    last, best, optimizer = load_head_state(run_dir)
    model.optimizer.build(head.trainable_variables)
    try:
        head.set_weights(last)
        for variable, value in zip(model.optimizer.variables, optimizer, strict=True):
            variable.assign(value)
    except ValueError as exc:
        raise ArtifactError(f"The head checkpoint in '{run_dir}' does not fit its model "
                            f"({exc}). Start the run again with --overwrite.") from exc
    return best


def _frozen_features(config: FinetuneConfig, spec: BaseSpec, splits: DataSplits,
                     extractor: keras.Model, image_size: int, precision: str,
                     reporter: Reporter
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Training and validation features of the frozen base, for the probe and for a head
    stage without augmentation: the frozen base gives every image the same features each
    epoch, so they are computed once (or taken from the feature cache)."""
    features = FeatureExtractor.of_base(lambda: extractor, spec, config.weights,
                                        config.data.seed, image_size, precision,
                                        config.data.batch_size, reporter, config.cache)
    train, val = features.features([splits.train, splits.val], "training and validation")
    features.save()
    reporter.info(f"Frozen-base features: {features.computed} images computed, "
                  f"{features.reused} from the cache.")
    return (train, splits.train.labels), (val, splits.val.labels)


def _train(record: RunRecord, spec: BaseSpec, splits: DataSplits, model: keras.Model,
           base: keras.Model, history: list[dict], done: int, reporter: Reporter,
           strategy: Any, resumed_stage: str | None = None,
           resumed_best: list[np.ndarray] | None = None) -> FinetuneResult:
    """Runs the stages not finished yet, checkpointing each epoch; writes the run at the end.
    A resumed head-only stage gets its best head weights so far as `resumed_best`."""
    with strategy.scope():
        return _train_in_scope(record, spec, splits, model, base, history, done, reporter,
                               strategy.num_replicas_in_sync, resumed_stage, resumed_best)


def _train_in_scope(record: RunRecord, spec: BaseSpec, splits: DataSplits,
                    model: keras.Model, base: keras.Model, history: list[dict], done: int,
                    reporter: Reporter, replicas: int, resumed_stage: str | None,
                    resumed_best: list[np.ndarray] | None) -> FinetuneResult:
    config = record.config
    assert isinstance(config, FinetuneConfig) and config.output is not None
    # --batch-size is per replica: each device sees that many images per step
    run_dir, batch, image_size = config.output, config.data.batch_size * replicas, \
        record.image_size
    train_ds = build_dataset(splits.train.sources, splits.train.labels, image_size, batch,
                             shuffle_seed=config.data.seed + done,
                             augment=build_augmentation(config.augment, config.data.seed))
    val_ds = build_dataset(splits.val.sources, splits.val.labels, image_size, batch)
    steps = math.ceil(len(splits.train) / batch)
    weights = None if record.class_weights is None else {
        splits.class_names.index(c): w for c, w in record.class_weights.items()}
    if record.class_weights is not None and done == 0:
        shown = ", ".join(f"{c} {w:.2f}" for c, w in record.class_weights.items())
        reporter.info(f"Classes are imbalanced; balanced class weights: {shown}")
    extra: list[keras.callbacks.Callback] = []
    if config.tensorboard:
        extra.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / TENSORBOARD_DIR)))
    results: list[StageResult] = []
    with StopOnSignal(reporter) as stop:
        for plan in plan_stages(config, spec):
            if done >= plan.last_epoch:  # finished before an interruption
                results.append(stage_result(plan, history, config.monitor,
                                            record.trainable_params[plan.name]))
                continue
            resuming = resumed_stage == plan.name and done > plan.first_epoch
            if not resuming:
                if plan.name == HEAD:
                    freeze_base(base)
                else:
                    unfreeze_top_blocks(base, spec, config.resolved_unfreeze_blocks,
                                        config.train_batchnorm)
                record = save_record(run_dir, record.replace(trainable_params={
                    **record.trainable_params, plan.name: count_params(model).trainable}))
            fitted, train, val, batch_size = model, train_ds, val_ds, None
            optimizer = None if resuming else config.optimizer
            if plan.name == HEAD and not config.augment.enabled:
                train, val = _frozen_features(config, spec, splits, model.get_layer("features"),
                                              image_size, record.compute.precision, reporter)
                reporter.info("Stage 'head' trains on the frozen-base features (no "
                              "augmentation).")
                if not resuming:  # checkpoints save the classifier, optimizer state included
                    compile_model(model, config.optimizer, plan.learning_rate,
                                  config.compute.jit)
                    save_checkpoint(run_dir, model)  # the frozen base, once per stage
                # A stand-alone model over the head's layers trains with the classifier's
                # optimizer (in stage 1 their trainable variables are the same), so checkpoints
                # of the classifier carry its state. Compiling the nested head itself would
                # make Keras save that optimizer under the head, where loading misses it.
                head = model.get_layer("head")
                fitted, batch_size, optimizer = keras.Model(head.inputs, head.outputs), batch, None
                compile_model(fitted, model.optimizer, plan.learning_rate, config.compute.jit)
            monitor = StageMonitor(config, plan, model, history,
                                   best=resumed_best if resuming else None)
            try:
                trainable = run_stage(
                    fitted, plan, train, val, reporter, steps, history, optimizer=optimizer,
                    first_epoch=done if resuming else None, class_weight=weights,
                    batch_size=batch_size, jit=config.compute.jit,
                    callbacks=[monitor, stop.callback(), *extra])
            except _Stop as stopped:  # every completed epoch is checkpointed already
                raise _interrupted(run_dir, record, history, stopped.signum) from None
            except TrainingDiverged as diverged:
                save_record(run_dir, record.replace(status=FAILED, failure=str(diverged)))
                raise
            monitor.finish()
            result = stage_result(plan, history, config.monitor, trainable)
            restore_best(model, run_dir, plan.name)  # the stage ends on its best epoch
            if result.stopped_early:
                reporter.info(f"Stage '{plan.name}' stopped early: no {config.monitor} "
                              f"improvement for {config.patience} epochs.")
            reporter.info(f"Stage '{plan.name}' keeps its best epoch, {result.best_epoch} "
                          f"({config.monitor} {result.metrics[config.monitor]:.4f}).")
            results.append(result)
            done = plan.last_epoch
        # Still inside StopOnSignal: a SIGTERM or Ctrl-C now waits for the save (about a
        # second), so the run ends complete instead of as a half-written model.
        model, choice, val_probabilities = _choose_model(
            model, run_dir, results, splits, image_size, batch, bool(config.dense_units),
            reporter)
        calibration, scores, test = _calibrate_and_score(model, choice, val_probabilities,
                                                         splits, image_size, batch, reporter)
        final = next((r for r in results if r.name == choice.kept), None)
        if history:
            save_figure(run_dir / CURVES_FILE, plot_curves(
                history, kept=None if final is None else (final.name, final.best_epoch)))
        calibrated = scale(val_probabilities, calibration.temperature)
        metrics = {"val_accuracy": scores[0].accuracy,
                   "val_loss": log_loss(calibrated, splits.val.labels)}
        record = save_run(run_dir, model, record.replace(
            stages=tuple(results), kept_stage=choice.kept, metrics=metrics, scores=scores,
            choice=choice, calibration=calibration), history)
    _report(record, spec, splits, model, calibrated, test, reporter)
    reporter.info(f"Saved the run to '{run_dir}'.")
    if stop.signum is not None:
        reporter.warning(f"{signal.Signals(stop.signum).name} arrived while the run was being "
                         f"saved; it was saved complete first.")
    return FinetuneResult(run_dir, splits.class_names, tuple(results), choice.kept,
                          tuple(history), scores, choice, calibration, test)


def _report(record: RunRecord, spec: BaseSpec, splits: DataSplits, model: keras.Model,
            val: np.ndarray, test: np.ndarray | None, reporter: Reporter) -> None:
    """RUN/report.html: the record, the kept model on val and test, and a map of the
    frozen-base features (from the cache the probe filled; with --no-cache, no map)."""
    config = record.config
    assert isinstance(config, FinetuneConfig) and config.output is not None
    names = splits.class_names
    evaluated = [Evaluated("val (it chose the model)", splits.val, val, classification_metrics(
        splits.val.labels, val, names, split="val", chose=True), model, record.image_size)]
    if test is not None and splits.test is not None:
        evaluated.append(Evaluated("test (held out)", splits.test, test, classification_metrics(
            splits.test.labels, test, names, split="test"), model, record.image_size))
    features = None
    if config.cache:  # the probe's features, from the cache; never a second pass for a map
        (x_train, _), (x_val, _) = _frozen_features(
            config, spec, splits, model.get_layer("features"), record.image_size,
            record.compute.precision, NullReporter())
        features = np.concatenate([x_train, x_val]), splits.train.join(splits.val)
    write_run_report(config.output, record, evaluated, features)
    reporter.info(f"Wrote {config.output / REPORT_FILE}.")


def _candidate(model: keras.Model, run_dir: Path, name: str, own_probe: bool) -> keras.Model:
    """The candidate model `name` (the probe or a stage's best): its weights restored into
    `model`; or, when `own_probe` (a head with a hidden layer the probe cannot fill), the
    probe's own saved model."""
    if name == PROBE and own_probe:
        return keras.saving.load_model(best_checkpoint(run_dir, name), compile=False,
                                       safe_mode=True)
    restore_best(model, run_dir, name)
    return model


def _choose_model(model: keras.Model, run_dir: Path, results: list[StageResult],
                  splits: DataSplits, image_size: int, batch: int, own_probe: bool,
                  reporter: Reporter) -> tuple[keras.Model, Choice, np.ndarray]:
    """Scores every candidate on val and keeps the simplest one that no later one beats by
    more than noise (training.choice); returns it, the choice and its val probabilities."""
    ds = build_dataset(splits.val.sources, None, image_size, batch)
    probabilities = {}
    for name in (PROBE, *(r.name for r in results)):
        probabilities[name] = predict_batches(_candidate(model, run_dir, name, own_probe), ds,
                                              len(splits.val), batch, reporter,
                                              f"Scoring the '{name}' model on val")
    choice = choose({name: p.argmax(axis=1) == splits.val.labels
                     for name, p in probabilities.items()})
    if choice.comparisons:
        reporter.info(describe_choice(choice))
    return (_candidate(model, run_dir, choice.kept, own_probe), choice,
            probabilities[choice.kept])


def _calibrate_and_score(model: keras.Model, choice: Choice, val_probabilities: np.ndarray,
                         splits: DataSplits, image_size: int, batch: int, reporter: Reporter
                         ) -> tuple[Calibration, tuple[Score, ...], np.ndarray | None]:
    """Fits a temperature on val and folds it into the kept model; scores it with intervals
    on val (which chose it) and on DATA/test when there is one, which nothing was chosen or
    fitted on. Calibration changes no answer, only how sure each one is."""
    labels = splits.val.labels
    temperature = fit_temperature(val_probabilities, labels)
    fold_temperature(model.get_layer("head").get_layer(PREDICTIONS), temperature)
    calibrated = scale(val_probabilities, temperature)
    values: dict[str, Any] = {
        "temperature": round(temperature, 4),
        "val_ece_before": expected_calibration_error(val_probabilities, labels),
        "val_ece_after": expected_calibration_error(calibrated, labels)}
    scores = [Score.of("val", choice.val_correct[choice.kept], len(labels), chose=True)]
    test = None
    if splits.test is not None and len(splits.test):
        ds = build_dataset(splits.test.sources, None, image_size, batch)
        test = predict_batches(model, ds, len(splits.test), batch, reporter,
                               "Scoring the test split")
        correct = int((test.argmax(axis=1) == splits.test.labels).sum())
        scores.append(Score.of("test", correct, len(splits.test), chose=False))
        values["test_ece_before"] = expected_calibration_error(scale(test, 1 / temperature),
                                                               splits.test.labels)
        values["test_ece_after"] = expected_calibration_error(test, splits.test.labels)
    calibration = Calibration(**{k: round(v, 4) for k, v in values.items()})
    reporter.info(f"Calibration: temperature {calibration.temperature:.2f}, expected "
                  f"calibration error on val {calibration.val_ece_before:.3f} -> "
                  f"{calibration.val_ece_after:.3f}"
                  + ("" if calibration.test_ece_after is None else
                     f", on test {calibration.test_ece_before:.3f} -> "
                     f"{calibration.test_ece_after:.3f}") + ".")
    return calibration, tuple(scores), test


def _interrupted(run_dir: Path, record: RunRecord, history: list[dict],
                 signum: int) -> RunInterrupted:
    """Records where training stopped and says how to continue."""
    name = signal.Signals(signum).name
    if not history:
        save_record(run_dir, record.replace(status=INTERRUPTED))
        return RunInterrupted(f"Stopped by {name} before the first epoch ended; there is no "
                              f"checkpoint to resume. Start again with --overwrite.", signum)
    where = Stopped(stage=history[-1]["stage"], epoch=history[-1]["epoch"], signal=name)
    save_record(run_dir, record.replace(status=INTERRUPTED, stopped=where))
    return RunInterrupted(
        f"Stopped by {name}. '{run_dir}' keeps its checkpoint from epoch {where.epoch} "
        f"(stage {where.stage}). Continue with: transferkit finetune --resume {run_dir}",
        signum)
