"""The epoch loop of a finetune: the stages of its Plan in order, each stopped early on its
monitored metric and ended on its best epoch, every epoch checkpointed; and resuming a run
from its last checkpoint in the right stage, with the right frozen layers, optimizer state,
learning rate and epoch.

`Training` is the state a run carries through the recipe (as fastai's Learner does): the
settings as given, the record (with its Plan), the data, the model and the history.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.augment import build_augmentation, build_mixing
from transferkit.bases import BaseSpec, get_base
from transferkit.config import FinetuneConfig
from transferkit.data.folders import DataSplits, ImageSet, Pool
from transferkit.data.pipeline import build_dataset
from transferkit.devices import build_strategy
from transferkit.errors import ArtifactError, RunInterrupted, StopRequested, TrainingDiverged
from transferkit.features import FeatureExtractor
from transferkit.model import PREDICTIONS, build_classifier, build_head
from transferkit.reporting import Reporter
from transferkit.runs.checkpoints import (
    best_checkpoint,
    load_checkpoint,
    load_head_state,
    restore_best,
    save_best,
    save_checkpoint,
)
from transferkit.runs.directory import (
    PSEUDO_FILE,
    TENSORBOARD_DIR,
    check_resumable,
    how_to_continue,
    load_run_splits,
    read_pseudo_labels,
    read_record,
    save_record,
)
from transferkit.runs.records import (
    FAILED,
    INTERRUPTED,
    Plan,
    RunRecord,
    StageResult,
    Stopped,
)
from transferkit.training.callbacks import Checkpointer, EpochTracker, OffCourseStopping
from transferkit.training.choice import LEAST_WIN, best_correct, projected_correct
from transferkit.training.freezing import count_params, freeze_base, unfreeze_top_blocks
from transferkit.training.plan import HEAD, PROBE, plan_stages, trains_on_images
from transferkit.training.prepare import data_summary, report_data
from transferkit.training.probe import LinearProbe
from transferkit.training.signals import StopOnSignal
from transferkit.training.stages import (
    StageInputs,
    StagePlan,
    compile_model,
    run_stage,
    stage_result,
    window_note,
)
from transferkit.workers import Cluster, shard


@dataclass
class Training:
    """A finetune run in progress."""

    config: FinetuneConfig  # as given
    run_dir: Path
    record: RunRecord  # as last saved; its plan once the data checks ran
    spec: BaseSpec
    splits: DataSplits
    model: keras.Model  # the classifier: features (preprocessing, base, pooling) and head
    base: keras.Model
    strategy: Any  # the tf.distribute.Strategy the model lives in
    reporter: Reporter
    class_weights: dict[str, float] | None = None  # balanced, by class name
    started: float = 0.0  # time.perf_counter() when the run started
    history: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0  # epochs completed, counted across stages
    resumed_stage: str | None = None
    resumed_best: list[np.ndarray] | None = None  # a resumed head-only stage's best weights
    phase: str = "training"  # what the run is doing, for a record of where a signal stopped it
    frozen: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = \
        field(default=None, repr=False)  # frozen_features, once computed
    cluster: Cluster | None = None  # --strategy multiworker: this worker's place
    pool: Pool | None = None  # --unlabeled's images, read (and checked) at the start
    pooled: np.ndarray | None = field(default=None, repr=False)  # pool_features, once computed
    pseudo: tuple[str | None, tuple[str, ...], np.ndarray] | None = field(
        default=None, repr=False)  # read_pseudo_labels, once read

    @property
    def chief(self) -> bool:
        """Whether this process writes the run (always, on one machine)."""
        return self.cluster is None or self.cluster.chief

    @property
    def plan(self) -> Plan:
        if self.record.plan is None:
            raise ArtifactError(f"'{self.run_dir}/run.json' has no plan: the run stopped "
                                f"before its stages began. Start it again with --overwrite.")
        return self.record.plan

    @property
    def smoothing(self) -> float | None:
        """The label smoothing the stages train with, 0 included, when labels are one-hot
        rows (label smoothing, MixUp or CutMix); None for class indices."""
        augment = self.plan.augment
        mixed = augment.enabled and (augment.mixup or augment.cutmix)
        smoothing = self.plan.label_smoothing
        if smoothing is None:  # a run from before the plan decided it
            smoothing = self.config.label_smoothing or 0.0
        return smoothing if smoothing or mixed else None

    @property
    def fit_class_weight(self) -> dict[int, float] | None:
        """The Plan's balanced class weights by class index, as Keras's fit takes them."""
        weights = self.plan.class_weights
        return None if weights is None else {
            self.splits.class_names.index(c): w for c, w in weights.items()}

    @property
    def batch(self) -> int:
        """Images per step: --batch-size is per replica."""
        return self.config.data.batch_size * self.strategy.num_replicas_in_sync

    def save(self, **changes: Any) -> None:
        """Writes run.json with `changes`."""
        self.record = save_record(self.run_dir, self.record.replace(**changes))

    def frozen_features(self
                        ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Training and validation features of the frozen base, for the probe, the combined
        candidate, a head stage without augmentation, refit and the report's map: the frozen
        base gives every image the same features, so they are computed (or read from the
        feature cache) once per process, the first time, while the base is the pretrained
        one."""
        if self.frozen is None:
            train, val = self.frozen_features_of([self.splits.train, self.splits.val],
                                                 "training and validation")
            self.frozen = (train, self.splits.train.labels), (val, self.splits.val.labels)
        return self.frozen

    def training_images(self) -> tuple[tuple[str, ...], np.ndarray, str | None]:
        """What the image stages train on: train's files and labels, then the pool images a
        pool candidate labelled (PSEUDO_FILE), and that candidate's name (None: no pool
        images)."""
        if self.pseudo is None:
            by, sources, labels = read_pseudo_labels(self.run_dir, self.splits.class_names)
            here = np.array([Path(s).is_file() for s in sources], bool)
            if not here.all():  # e.g. a pool moved, or a cleared cache, before --resume
                self.reporter.warning(
                    f"{int((~here).sum())} of the {len(sources)} pool images in "
                    f"'{self.run_dir / PSEUDO_FILE}' are gone (e.g. {sources[int(np.argmin(here))]}"
                    f"): the stages train without them.")
                sources = tuple(s for s, ok in zip(sources, here, strict=True) if ok)
                labels = labels[here]
            self.pseudo = by, sources, labels
        by, sources, labels = self.pseudo
        train = self.splits.train
        return (*train.sources, *sources), np.r_[train.labels, labels].astype(np.int64), by

    def pool_features(self) -> np.ndarray:
        """The frozen base's features of the unlabelled pool (the run must have one), computed
        once per process for every candidate that learns from it."""
        if self.pooled is None:
            assert self.pool is not None
            (self.pooled,) = self.frozen_features_of([self.pool.images], "the unlabelled pool")
        return self.pooled

    def frozen_features_of(self, images: list[ImageSet], what: str) -> list[np.ndarray]:
        """The frozen base's features of each of `images`, through the feature cache (while
        the base is the pretrained one)."""
        config = self.config
        features = FeatureExtractor.of_base(
            lambda: self.model.get_layer("features"), self.spec, config.weights,
            config.data.seed, self.record.image_size, self.record.compute.precision,
            config.data.batch_size, self.reporter, config.cache)
        found = features.features(images, what)
        features.save()
        self.reporter.info(f"Frozen-base features of {what}: {features.computed} images "
                           f"computed, {features.reused} from the cache.")
        return list(found)


def resume(run_dir: Path, reporter: Reporter, cluster: Cluster | None = None) -> Training:
    """The Training of an interrupted run, from its last checkpoint (for a worker that is
    not the chief, `run_dir` is its copy of the chief's run).

    Raises:
        ArtifactError: `run_dir` is not an unfinished finetune run, or has no checkpoint.
    """
    record = read_record(run_dir, finished=False)
    check_resumable(run_dir, record, "finetune")
    config = record.config
    assert isinstance(config, FinetuneConfig)  # check_resumable checked the command
    spec = get_base(record.base)
    if record.plan is None:  # recipe.resume_finetune starts such a run again
        raise ArtifactError(f"'{run_dir}' stopped before its stages began. "
                            f"{how_to_continue(run_dir)}")
    strategy = build_strategy(config.compute.strategy)
    with strategy.scope():  # layers keep the dtype policies they were saved with
        model, state = load_checkpoint(run_dir, [s.name for s in plan_stages(
            config, record.plan, spec)])
    splits = load_run_splits(run_dir, record, reporter)
    report_data(splits, reporter)
    # files may have gone since, and it may run on fewer (or more) devices and workers now
    record = record.replace(data=data_summary(splits), compute=dataclasses.replace(
        record.compute, strategy=type(strategy).__name__,
        replicas=strategy.num_replicas_in_sync))
    reporter.info(f"Resuming stage '{state['stage']}' after epoch {state['epoch']}.")
    keras.utils.set_random_seed(config.data.seed + int(state["epoch"]))
    base = model.get_layer("features").get_layer(record.base_layer)
    training = Training(config, run_dir, record, spec, splits, model, base, strategy, reporter,
                        record.plan.class_weights, history=list(state["history"]),
                        done=int(state["epoch"]), resumed_stage=state["stage"], cluster=cluster)
    if state.get("head_only"):
        training.resumed_best = _restore_head_state(model, run_dir)
    return training


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


def train_stages(run: Training, stop: StopOnSignal) -> list[StageResult]:
    """Runs the Plan's stages not finished yet (inside the strategy's scope); each ends on
    its best epoch."""
    results: list[StageResult] = []
    n = len(run.splits.val)
    for stage in plan_stages(run.config, run.plan, run.spec):
        if run.done >= stage.last_epoch:  # finished before an interruption
            results.append(stage_result(stage, run.history, run.config.monitor,
                                        run.record.trainable_params[stage.name],
                                        run.config.epoch_window))
            continue
        bar, needed = bar_to_clear(run, results)
        if run.config.patience and needed > n:  # --patience 0: no stage ends early, or is skipped
            run.reporter.info(f"Stage '{stage.name}' and any after it skipped: the '{bar[0]}' "
                              f"model got {bar[1]} of {n} val images right, and a later "
                              f"candidate is kept only by more than noise, which takes at least "
                              f"{LEAST_WIN} more.")
            break
        result = _train_stage(run, stage, stop, needed)
        restore_best(run.model, run.run_dir, stage.name)  # the stage ends on its best epoch
        rows = [r for r in run.history if r["stage"] == stage.name]
        if result.stopped_early and best_correct(rows, n) < needed:
            run.reporter.info(f"Stage '{stage.name}' stopped after {result.epochs} epochs: not "
                              f"on course to be kept. Its best epoch got {best_correct(rows, n)} "
                              f"of {n} val images right and at its pace would reach about "
                              f"{projected_correct(rows, n, stage.last_epoch):.0f} by its last "
                              f"epoch; beating the '{bar[0]}' model's {bar[1]} by more than "
                              f"noise takes at least {needed}.")
        elif result.stopped_early:
            run.reporter.info(f"Stage '{stage.name}' stopped early: no {run.config.monitor} "
                              f"improvement for {run.config.patience} epochs.")
        chosen = window_note(run.config.epoch_window, result.epochs)
        run.reporter.info(f"Stage '{stage.name}' keeps its best epoch, {result.best_epoch} "
                          f"({run.config.monitor} {result.metrics[run.config.monitor]:.4f}"
                          + (f"; chosen {chosen}" if chosen else "") + ").")
        results.append(result)
        run.done = stage.last_epoch
    return results


# Epochs past a stage's warm-up after which its pace decides whether it is on course to be
# kept (two give the first pace). On photos, fine-tuning flat at 114 of 120 val images (the
# probe had 118) ran 5 epochs under the old rule (--patience epochs in), and the default run
# cost 3.5x a probe-only one; judged after 3 epochs, 2.9-3.2x; the issue allows 3x
# (bench/README.md).
ON_COURSE_EPOCHS = 2


def save_probe_model(run: Training, probe: LinearProbe, name: str) -> None:
    """Saves the classifier with `probe`'s weights as candidate `name`: the run's model (a
    linear head starts from them, LP-FT), or a model of its own for a head with a hidden
    layer."""
    candidate = run.model
    if run.config.dense_units:  # built for saving only, so outside the strategy
        candidate = build_classifier(run.model.get_layer("features"), build_head(
            probe.kernel.shape[0], len(run.splits.class_names)))
    candidate.get_layer("head").get_layer(PREDICTIONS).set_weights([probe.kernel, probe.bias])
    save_best(run.run_dir, candidate, name)


def bar_to_clear(run: Training, results: Sequence[StageResult]) -> tuple[tuple[str, int], int]:
    """The best candidate kept so far (those fitted before the stages only if they beat the
    probe) with its val images right, and how many a next candidate must get right to be
    kept (LEAST_WIN more); 0 for a run recorded before probes counted theirs."""
    n = len(run.splits.val)
    probe = run.record.probe
    if probe is None or probe.val_correct is None:
        return (PROBE, 0), 0
    candidates = [(PROBE, probe.val_correct),
                  *((c.name, c.val_correct) for c in run.record.candidates if c.won)]
    candidates += [(r.name, round((r.best_val_accuracy or 0) * n)) for r in results]
    best = max(candidates, key=lambda b: b[1])
    return best, best[1] + LEAST_WIN


def _train_stage(run: Training, stage: StagePlan, stop: StopOnSignal,
                 needed: int = 0) -> StageResult:
    """One stage: freeze or unfreeze, compile, fit with the callbacks; checkpointed each
    epoch. A signal leaves it as an interrupted run, a diverged loss as a failed one."""
    config = run.config
    resuming = run.resumed_stage == stage.name and run.done > stage.first_epoch
    if not resuming:
        _set_trainable(run, stage)
        run.save(trainable_params={**run.record.trainable_params,
                                   stage.name: count_params(run.model).trainable})
    fitted, train, val, batch_size, images = _stage_inputs(run, stage, resuming)
    # on course or not: judged after ON_COURSE_EPOCHS past the warm-up, at most --patience in
    judge_after = min(config.patience, stage.schedule.warmup_epochs + ON_COURSE_EPOCHS)
    tracker = EpochTracker(stage.name, config.monitor, run.history, config.epoch_window)
    checkpointer = Checkpointer(tracker, run.run_dir, run.model,
                                best=run.resumed_best if resuming else None)
    stopping = OffCourseStopping(tracker, config.patience, needed, len(run.splits.val),
                                 stage.last_epoch, judge_after)
    extra = [keras.callbacks.TensorBoard(log_dir=str(run.run_dir / TENSORBOARD_DIR))
             ] if config.tensorboard else []
    try:
        trainable = run_stage(StageInputs(
            fitted, stage, train, val, math.ceil(images / run.batch), run.history,
            optimizer=None if resuming or fitted is not run.model else config.optimizer,
            first_epoch=run.done if resuming else None, class_weight=run.fit_class_weight,
            batch_size=batch_size, jit=config.compute.jit, val_labels=run.splits.val.labels,
            label_smoothing=run.smoothing, cluster=run.cluster,
            callbacks=[tracker, checkpointer, stopping, stop.callback(), *extra]), run.reporter)
    except StopRequested as stopped:  # every completed epoch is checkpointed already
        raise interrupted(run, stopped.signum) from None
    except TrainingDiverged as diverged:
        run.save(status=FAILED, failure=str(diverged))
        raise
    checkpointer.finish()
    return stage_result(stage, run.history, config.monitor, trainable, config.epoch_window)


def _set_trainable(run: Training, stage: StagePlan) -> None:
    """Freezes the base for the head stage, else unfreezes the Plan's top blocks."""
    if stage.name == HEAD:
        freeze_base(run.base)
    else:
        unfreeze_top_blocks(run.base, run.spec, run.plan.unfreeze_blocks,
                            run.config.train_batchnorm)


def _stage_inputs(run: Training, stage: StagePlan, resuming: bool
                  ) -> tuple[keras.Model, Any, Any, int | None, int]:
    """The model a stage fits, its training and validation data and its training images: the
    classifier on (augmented) image datasets of train and the pool images a pool candidate
    labelled, or, for a head stage without augmentation, the head alone on cached frozen-base
    features of train (then with the batch size to use)."""
    config, plan = run.config, run.plan
    k = len(run.splits.class_names)
    if trains_on_images(stage.name, plan):
        sources, labels, by = run.training_images()
        if by is not None:
            run.reporter.info(f"Stage '{stage.name}' trains on train's {len(run.splits.train)} "
                              f"images and {len(sources) - len(run.splits.train)} pool images "
                              f"that '{by}' labelled.")
        val = build_dataset(run.splits.val.sources, run.splits.val.labels, run.record.image_size,
                            run.batch)
        if run.smoothing is not None:  # one-hot rows
            import tensorflow as tf

            val = val.map(lambda x, y: (x, tf.one_hot(y, k)))
        return run.model, _training_dataset(run, sources, labels), val, None, len(sources)
    train, val = run.frozen_features()
    images, batch = len(train[0]), run.batch
    if run.cluster is not None:
        train = (shard(train[0], run.cluster), shard(train[1], run.cluster))
        batch = config.data.batch_size
    if run.smoothing is not None:
        train, val = ((x, np.eye(k, dtype=np.float32)[y]) for x, y in (train, val))
    run.reporter.info("Stage 'head' trains on the frozen-base features (no augmentation).")
    if not resuming:  # checkpoints save the classifier, optimizer state included
        compile_model(run.model, config.optimizer, stage.learning_rate, config.compute.jit,
                      run.smoothing)
        save_checkpoint(run.run_dir, run.model)  # the frozen base, once per stage
    # A stand-alone model over the head's layers trains with the classifier's optimizer (in
    # the head stage their trainable variables are the same), so checkpoints of the
    # classifier carry its state. Compiling the nested head itself would make Keras save that
    # optimizer under the head, where loading misses it.
    head = run.model.get_layer("head")
    fitted = keras.Model(head.inputs, head.outputs)
    compile_model(fitted, run.model.optimizer, stage.learning_rate, config.compute.jit,
                  run.smoothing)
    return fitted, train, val, batch, images


def _training_dataset(run: Training, sources: Sequence[str], labels: np.ndarray) -> Any:
    """The augmented, shuffled image batches a stage trains on (across workers, this
    worker's share of the files, in batches per replica); one-hot rows, mixed as asked, when
    the labels are smoothed or mixed."""
    config, plan = run.config, run.plan
    batch = run.batch
    if run.cluster is not None:
        sources, labels = shard(sources, run.cluster), shard(labels, run.cluster)
        batch = config.data.batch_size
    train = build_dataset(sources, labels, run.record.image_size, batch,
                          shuffle_seed=config.data.seed + run.done,
                          augment=build_augmentation(plan.augment, config.data.seed),
                          replicas=1 if run.cluster else run.strategy.num_replicas_in_sync)
    if run.smoothing is not None:
        import tensorflow as tf

        k = len(run.splits.class_names)
        train = train.map(lambda x, y: (x, tf.one_hot(y, k)))
        mixing = build_mixing(plan.augment, config.data.seed)
        train = train if mixing is None else train.map(mixing)
    return train


def refit_stages(run: Training, results: Sequence[StageResult], kept: str,
                 probe: LinearProbe, stop: StopOnSignal) -> tuple[int, int]:
    """Trains the kept stage's model again on train and val together (and the pool images a
    pool candidate labelled): from the pretrained base with `probe` (refitted on both) as
    its head, every stage up to the kept one on its own schedule, each stopped at the epoch
    it kept, so the model learns from val's labels on the path val chose. No epoch is
    checkpointed or added to the run's history (it has no val): an interruption leaves the
    kept model as trained on train. Returns the images and the epochs trained.

    Raises:
        StopRequested: a signal arrived (the model is then the kept one again).
        TrainingDiverged: the loss became non-finite (the same).
    """
    config, plan = run.config, run.plan
    sources, labels, _ = run.training_images()
    sources = (*sources, *run.splits.val.sources)
    labels = np.r_[labels, run.splits.val.labels].astype(np.int64)
    restore_best(run.model, run.run_dir, PROBE)  # the pretrained base, the probe's head
    run.model.get_layer("head").get_layer(PREDICTIONS).set_weights([probe.kernel, probe.bias])
    keras.utils.set_random_seed(config.data.seed)
    ends = {r.name: r.best_epoch for r in results}
    epochs = 0
    try:
        for stage in plan_stages(config, plan, run.spec):
            _set_trainable(run, stage)
            again = dataclasses.replace(stage, name=f"refit {stage.name}",
                                        last_epoch=ends[stage.name], schedule_epochs=stage.epochs)
            run_stage(StageInputs(
                run.model, again, _training_dataset(run, sources, labels), None,
                math.ceil(len(sources) / run.batch), [], optimizer=config.optimizer,
                class_weight=run.fit_class_weight, jit=config.compute.jit,
                label_smoothing=run.smoothing, callbacks=[stop.callback()]), run.reporter)
            epochs += again.epochs
            if stage.name == kept:
                break
    except (StopRequested, TrainingDiverged):
        restore_best(run.model, run.run_dir, kept)
        raise
    return len(sources), epochs


def interrupted(run: Training, signum: int) -> RunInterrupted:
    """Records where training stopped and says how to continue (a worker that is not the
    chief points at the chief's run, which every worker resumes)."""
    name = signal.Signals(signum).name
    if not run.chief:
        run.save(status=INTERRUPTED, stopped=Stopped(phase=run.phase, signal=name))
        return RunInterrupted(f"Stopped by {name} during {run.phase}, with the other workers. "
                              f"The chief keeps the run: continue with transferkit finetune "
                              f"--resume {run.config.output} on every worker.", signum)
    if not run.history:
        run.save(status=INTERRUPTED, stopped=Stopped(phase=run.phase, signal=name))
        probe, saved = run.record.probe, best_checkpoint(run.run_dir, PROBE)
        usable = (f" The probe it fitted ({probe.val_correct} of {len(run.splits.val)} val "
                  f"images right) is a usable plain Keras model: {saved}."
                  if probe is not None and saved.is_file() else "")
        return RunInterrupted(f"Stopped by {name} during {run.phase}, before the first epoch "
                              f"ended.{usable} {how_to_continue(run.run_dir)}", signum)
    where = Stopped(stage=run.history[-1]["stage"], epoch=run.history[-1]["epoch"], signal=name)
    run.save(status=INTERRUPTED, stopped=where)
    return RunInterrupted(
        f"Stopped by {name}. '{run.run_dir}' keeps its checkpoint from epoch {where.epoch} "
        f"(stage {where.stage}). Continue with: transferkit finetune --resume {run.run_dir}",
        signum)
