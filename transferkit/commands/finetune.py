"""`finetune`, the staged recipe (LP-FT): a linear probe on frozen features first (the first
usable model, and the bar to beat), data checks that decide how deep to tune and whether
flips keep labels, then the head and the top blocks at a lower rate; the simplest candidate
is kept unless another wins by more than noise, calibrated, and scored once on DATA/test.

The epoch loop and resuming live in loop.py, the decisions in plan.py, every callback in
callbacks.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.bases import get_base
from transferkit.calibration import (
    expected_calibration_error,
    fit_temperature,
    fold_temperature,
    log_loss,
    scale,
)
from transferkit.config import AUTO_BASE, FinetuneConfig
from transferkit.data.folders import DataSplits, read_pool
from transferkit.data.pipeline import build_dataset
from transferkit.errors import ArtifactError, DataError, StopRequested, TrainingDiverged
from transferkit.files import save_figure
from transferkit.inference import predict_batches
from transferkit.metrics import classification_metrics
from transferkit.model import PREDICTIONS, with_features
from transferkit.novelty import fit_novelty
from transferkit.reporting import NullReporter, Reporter
from transferkit.reports.plots import plot_curves, plot_lr_find
from transferkit.reports.run import Evaluated, write_run_report
from transferkit.runs.checkpoints import best_checkpoint, checkpointed, restore_best
from transferkit.runs.directory import (
    CURVES_FILE,
    LR_FIND_FILE,
    NOVELTY_FILE,
    PSEUDO_FILE,
    REPORT_FILE,
    check_resumable,
    clear_run,
    how_it_ended,
    load_keras_file,
    run_lock,
    save_pseudo_labels,
    save_record,
    save_run,
    save_splits,
)
from transferkit.runs.records import (
    INTERRUPTED,
    RUNNING,
    Calibration,
    CandidateRecord,
    Choice,
    Compute,
    NoveltyRecord,
    ProbeRecord,
    Refit,
    RunRecord,
    Score,
    StageResult,
)
from transferkit.training.adaptation import assess
from transferkit.training.candidates import (
    CANDIDATES,
    Candidate,
    Fitted,
    fitted_before_the_stages,
    labelled_the_pool,
    row,
)
from transferkit.training.checks import lr_find
from transferkit.training.choice import choose
from transferkit.training.choice import describe as describe_choice
from transferkit.training.loop import (
    Training,
    bar_to_clear,
    interrupted,
    refit_stages,
    resume,
    save_probe_model,
    train_stages,
)
from transferkit.training.plan import PROBE, build_plan
from transferkit.training.prepare import data_summary, prepare
from transferkit.training.probe import LinearProbe, fit_probe
from transferkit.training.signals import StopOnSignal, raise_on_sigterm
from transferkit.training.stages import class_weights
from transferkit.workers import (
    JOIN_LIMIT_S,
    Cluster,
    cluster_of,
    scratch_copy,
    share_text,
    weights_digest,
)


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
    # candidates fitted before the stages that did not beat the probe, with val images right
    dropped: dict[str, int] = field(default_factory=dict)
    refit: Refit | None = None  # the kept model fitted again on train + val


def finetune(config: FinetuneConfig, reporter: Reporter | None = None,
             splits: DataSplits | None = None) -> FinetuneResult | None:
    """Trains a classifier on `config.data` (split as `splits` when given: cv's folds) and
    writes the run directory. Across workers (--strategy multiworker) the chief does all of
    that; the others train the stages with it, in a scratch folder, and return None.

    Args:
        config: the settings as the user gave them.
        reporter: where progress goes (none when None).
        splits: the splits to train on (cv's folds); default: read from config.data.

    Returns:
        The kept model's name, its scores, the choice and calibration; None on a worker
        that is not the chief.

    Raises:
        TransferkitError: bad data, options, weights, or an existing output (all checked
            before anything is written); RunInterrupted when stopped by a signal.
    """
    reporter = reporter or NullReporter()
    if config.output is None:
        raise ArtifactError("finetune needs a run directory: pass -o RUN.")
    cluster = cluster_of(config.compute.strategy)
    with _run_folder(config.output, cluster, copy=False) as run_dir, raise_on_sigterm():
        training = _start(config, run_dir, reporter, splits, cluster)  # data, model; run.json
        with _recording_how_it_ends(training):
            if training.chief:
                training.phase = "the probe"
                probe, probe_right = _probe(training)  # the first candidate, the bar to beat
                for candidate in (c for c in CANDIDATES if not c.after_checks):
                    _try(training, candidate, probe, probe_right)
                training.phase = "the data checks"
                _decide(training)  # data checks -> the Plan, recorded once
                for candidate in (c for c in CANDIDATES if c.after_checks):
                    _try(training, candidate, probe, probe_right)
            training.phase = "training"
            return _train_and_keep(training)  # stages, choice, calibration, scores, report


def resume_finetune(run_dir: Path, reporter: Reporter | None = None) -> FinetuneResult | None:
    """Continues an interrupted `finetune` from its last completed epoch; one stopped before
    its first checkpoint (reading data, the probe, the data checks) starts again with its
    saved settings. Across workers, every worker reads the chief's run (a shared folder).

    Args:
        run_dir: the interrupted run; its settings are run.json's.
        reporter: where progress goes (none when None).

    Returns:
        As finetune.

    Raises:
        ArtifactError: `run_dir` is not an unfinished run, or has no checkpoint yet.
    """
    from transferkit.runs.directory import read_record

    reporter = reporter or NullReporter()
    record = read_record(run_dir, finished=False)  # a missing folder: an error, not a folder
    check_resumable(run_dir, record, "finetune")
    assert isinstance(record.config, FinetuneConfig)  # check_resumable checked the command
    if record.status in (INTERRUPTED, RUNNING) and \
            checkpointed(run_dir) is None:  # RUNNING: killed -9
        reporter.info(f"'{run_dir}' stopped before its first checkpoint: starting it again "
                      f"with its saved settings.")
        return finetune(dataclasses.replace(record.config, output=run_dir, overwrite=True),
                        reporter)
    cluster = cluster_of(record.config.compute.strategy)
    with _run_folder(run_dir, cluster, copy=True) as folder, raise_on_sigterm():
        training = resume(folder, reporter, cluster)
        with _recording_how_it_ends(training):
            return _train_and_keep(training)


@contextlib.contextmanager
def _run_folder(run_dir: Path, cluster: Cluster | None, copy: bool) -> Iterator[Path]:
    """The folder this process writes, locked: the run's, or, for a worker that is not the
    chief, a scratch folder (a copy of the run, to resume) removed at the end."""
    if cluster is None or cluster.chief:
        with run_lock(run_dir):
            yield run_dir
        return
    scratch = scratch_copy(run_dir if copy else None)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _recording_how_it_ends(run: Training) -> Iterator[None]:
    """Whatever ends a run early (a signal, a full disk, data gone, a bug), run.json says
    so: interrupted where it stopped, when a checkpoint allows --resume; failed, with the
    reason, when nothing can be resumed."""
    try:
        yield
    except (KeyboardInterrupt, StopRequested) as exc:
        if run.record.status != RUNNING:
            raise
        signum = exc.signum if isinstance(exc, StopRequested) else signal.SIGINT
        raise interrupted(run, signum) from None
    except BaseException as exc:
        if run.record.status == RUNNING:
            with contextlib.suppress(OSError):  # a full disk may refuse this write too
                run.save(**how_it_ended(exc, run.phase, checkpointed(run.run_dir)))
        raise


def _start(config: FinetuneConfig, run_dir: Path, reporter: Reporter,
           splits: DataSplits | None, cluster: Cluster | None) -> Training:
    """Reads the data, builds the model (the best-ranked base for --base auto), runs the
    learning-rate range test when asked, and writes run.json as running in `run_dir`."""
    started = time.perf_counter()
    base = config.base
    if base == AUTO_BASE:
        from transferkit.commands.bases import rank_bases

        ranking = rank_bases(config.data, reporter, config.cache)
        base = ranking.best
        reporter.info("Bases ranked on the data: " + ", ".join(
            f"{r.base} {r.score.accuracy:.3f}" for r in ranking.ranks) + f"; fine-tuning "
            f"{base} (a costlier base must win by more than noise).")
    if cluster is not None:
        reporter.info(f"Training across workers: this is {cluster.describe()}. Waiting for "
                      f"every worker to start (at most {JOIN_LIMIT_S // 60} minutes; Ctrl-C "
                      f"ends the wait).")
    prepared = prepare(config, get_base(base), reporter, splits,
                       output=config.output if cluster is None or cluster.chief else None)
    found = lr_find(config, prepared, reporter) if config.lr_find else None
    record = RunRecord(
        command="finetune", config=config, base=prepared.spec.name,
        base_layer=prepared.base.name, preprocessing=prepared.spec.preprocessing,
        class_names=prepared.splits.class_names, image_size=prepared.image_size,
        compute=Compute(precision=prepared.precision, jit=config.compute.jit,
                        strategy=type(prepared.strategy).__name__,
                        replicas=prepared.strategy.num_replicas_in_sync),
        data=data_summary(prepared.splits), lr_find=found, status=RUNNING)
    pool = None if config.unlabeled is None else read_pool(  # refused before any work
        config.unlabeled, config.data.data_dir, prepared.splits.every_image(), reporter)
    if config.overwrite:
        clear_run(run_dir)
    save_splits(run_dir, prepared.splits.rows())
    if found is not None:
        save_figure(run_dir / LR_FIND_FILE, plot_lr_find(found))
    return Training(config, run_dir, save_record(run_dir, record), prepared.spec,
                    prepared.splits, prepared.model, prepared.base, prepared.strategy,
                    reporter, _class_weights(config, prepared.splits, reporter), started,
                    cluster=cluster, pool=pool)


def _probe(run: Training) -> tuple[LinearProbe, np.ndarray]:
    """Fits the linear probe on frozen features of train, says its val score (the bar to
    beat) and saves it as the first candidate model, the first usable one. A linear head
    starts from its weights (LP-FT); a head with a hidden layer gets a probe model of its
    own. Returns it, and which val images it got right."""
    (x_train, y_train), (x_val, y_val) = run.frozen_features()
    broken = int((~np.isfinite(x_train)).any(axis=1).sum() + (~np.isfinite(x_val)).any(
        axis=1).sum())
    if broken:
        failure = (f"The frozen {run.spec.name} base gives non-finite features (NaN or inf) for "
                   f"{broken} of {len(x_train) + len(x_val)} images, so nothing can be "
                   f"trained on them: its weights ('{run.config.weights}') are damaged, or were "
                   f"saved from a model whose training diverged. Use other weights (e.g. "
                   f"--weights imagenet).")
        raise TrainingDiverged(failure)  # recorded as failed by _recording_how_it_ends
    probe = fit_probe(x_train, y_train, len(run.splits.class_names),
                      balanced=run.class_weights is not None, seed=run.config.data.seed)
    right = probe.probabilities(x_val).argmax(axis=1) == y_val
    correct = int(right.sum())
    how = (f"C={probe.c:g} by {probe.folds}-fold cross-validation on train" if probe.folds
           else f"C={probe.c:g}: a class has one training image, too few to cross-validate")
    run.reporter.info(f"Linear probe ({how}; {probe.seconds:.1f} s): "
                      f"{Score.of('val', correct, len(y_val), chose=False).describe()}. "
                      f"The kept model must beat it by more than noise.")
    save_probe_model(run, probe, PROBE)
    ready = time.perf_counter() - run.started
    run.reporter.info(f"First usable model (the probe) saved after {ready:.0f} s.")
    run.save(probe=ProbeRecord(c=probe.c, folds=probe.folds, fit_seconds=round(probe.seconds, 3),
                               ready_after=round(ready, 3), val_correct=correct))
    return probe, right


def _try(run: Training, candidate: Candidate, probe: LinearProbe, probe_right: np.ndarray,
         ) -> None:
    """Fits one row of the candidates table unless the candidates so far leave it no room,
    judges it against the probe by the paired rule, says so in one line, saves its model
    when it won (else the choice could never keep it), hands a pool candidate's labels to
    the stages, and records it either way."""
    if _no_room(run):
        return
    run.phase = candidate.phase
    fitted = candidate.fit(run, probe)
    if fitted is None:
        return
    n, correct = len(run.splits.val), int(fitted.right.sum())
    won = choose({PROBE: probe_right, fitted.name: fitted.right}).kept == fitted.name
    run.reporter.info(f"{fitted.summary} ({fitted.seconds:.1f} s): {correct} of {n} val images "
                      f"right, against the probe's {run.record.probe.val_correct}"
                      + (", beyond noise." if won else ", within noise."))
    details = fitted.details
    if won:
        fitted.save(run)
    if _hand_pool_labels(run, fitted, correct):
        details = {**details, "stages_train_on": PSEUDO_FILE}
    run.save(candidates=(*run.record.candidates, CandidateRecord(
        name=fitted.name, kind=candidate.kind, summary=fitted.summary, val_correct=correct,
        won=won, seconds=round(fitted.seconds, 3), details=details)))


def _hand_pool_labels(run: Training, fitted: Fitted, correct: int) -> bool:
    """Writes the pool images a pool candidate labelled, for the image stages to train on
    beside train's (noisy student, Xie et al. 2020: the stages' augmentation is the noise),
    when it got at least as many val images right as the probe and more than a pool
    candidate before it. A model the stages train is kept only by the paired rule, so the
    labels need not have won on their own: on 100 val images, co-training often gains one or
    two over the probe, and the stage trained on its labels 10 or more (bench/README.md).
    Only on one machine: other workers would not read the file."""
    if fitted.pseudo is None or not len(fitted.pseudo[0]) or run.cluster is not None \
            or correct < run.record.probe.val_correct:
        return False
    earlier = labelled_the_pool(run.record.candidates)
    if earlier is not None and earlier.val_correct >= correct:
        return False
    sources, labels = fitted.pseudo
    save_pseudo_labels(run.run_dir, sources, [run.splits.class_names[i] for i in labels],
                       fitted.name)
    return True


def _no_room(run: Training) -> bool:
    """Whether the candidates so far leave no later one room to be kept (val all right, or
    one short): then the stages are skipped, and nothing is prepared for them. --patience 0
    turns this off, as it turns off every early end."""
    return bool(run.config.patience) and bar_to_clear(run, [])[1] > len(run.splits.val)


def _class_weights(config: FinetuneConfig, splits: DataSplits,
                   reporter: Reporter) -> dict[str, float] | None:
    """Balanced class weights by name when --class-weight asks or the classes differ."""
    names = splits.class_names
    weights = class_weights(splits.train.labels, len(names), config.class_weight)
    if weights is None:
        return None
    by_name = {names[i]: w for i, w in weights.items()}
    reporter.info("Classes are imbalanced; balanced class weights: " + ", ".join(
        f"{c} {w:.2f}" for c, w in by_name.items()))
    return by_name


def _decide(run: Training) -> None:
    """Runs the data checks (when a stage needs them), resolves the Plan and records it: the
    one place what transferkit decides is written."""
    config, found = run.config, None
    # the checks decide the fine-tuning depth and the flips of any stage that augments; a
    # run of the probe alone needs neither, nor a run whose stages will be skipped
    if config.adapt and (config.tunes or (config.epochs and config.augment.enabled)
                         ) and not _no_room(run):
        train = run.splits.train
        (x_train, _), _ = run.frozen_features()
        found = assess(train.sources, train.labels, x_train, run.record.probe.c,
                       balanced=run.class_weights is not None, seed=config.data.seed)
        if found is None:
            run.reporter.info("Too few training images per class to check the data; "
                              "fine-tuning the top blocks with the augmentation as given.")
    rate = None if run.record.lr_find is None else run.record.lr_find.suggestion
    plan = build_plan(config, run.spec, rate, found, run.class_weights)
    if found is not None:
        run.reporter.info(f"Data checks: {found.describe()}" + (
            f"\nGiven and kept over that: {', '.join(plan.stood)}." if plan.stood else ""))
    run.save(adaptation=found, plan=plan)


def _warn_if_one_answer(run: Training, val: np.ndarray) -> None:
    """Names a kept model that gives one class for every val image of several classes: it
    tells nothing apart (a base that gives every image the same features does this)."""
    answers = np.unique(val.argmax(axis=1))
    if len(answers) == 1 and len(np.unique(run.splits.val.labels)) > 1:
        run.reporter.warning(
            f"The kept model answers '{run.splits.class_names[answers[0]]}' for every one of "
            f"the {len(val)} val images: it learned nothing that tells the classes apart. "
            f"Check the data (doctor, audit) and --weights ('{run.config.weights}'; imagenet "
            f"is the usual choice).")


def _train_and_keep(run: Training) -> FinetuneResult | None:
    """The stages, then the choice among the candidates, calibration and scores; writes the
    run. A signal during the final save waits for it (about a second), so the run ends
    complete instead of as a half-written model."""
    _share_record(run)
    with StopOnSignal(run.reporter) as stop:
        with run.strategy.scope():
            results = train_stages(run, stop)
        if run.cluster is not None:
            run.reporter.info(f"Stages done on {run.cluster.size} workers; the weights of "
                              f"{run.cluster.describe()}: {weights_digest(run.model)}.")
            if not run.chief:
                run.reporter.info(f"The chief writes the run to '{run.config.output}'.")
                return None
        # the rest runs on this process alone, outside the strategy (a model made inside a
        # multi-worker one would wait for the other workers)
        model, choice, val = _choose_model(run, results)
        refit = _refit(run, model, choice.kept, results, stop) if run.config.refit else None
        calibration, scores, test = _calibrate_and_score(run, model, choice, val)
        novelty = _novelty(run, model, choice.kept, scale(val, calibration.temperature))
        final = next((r for r in results if r.name == choice.kept), None)
        if run.history:
            save_figure(run.run_dir / CURVES_FILE, plot_curves(
                run.history, kept=(choice.kept, None) if final is None else (final.name,
                                                                            final.best_epoch)))
        calibrated = scale(val, calibration.temperature)
        metrics = {"val_accuracy": scores[0].accuracy,
                   "val_loss": log_loss(calibrated, run.splits.val.labels)}
        run.record = save_run(run.run_dir, model, run.record.replace(
            stages=tuple(results), kept_stage=choice.kept, metrics=metrics, scores=scores,
            choice=choice, calibration=calibration, refit=refit, novelty=novelty), run.history)
    _report(run, model, calibrated, test)
    run.reporter.info(f"Saved the run to '{run.run_dir}'.")
    _warn_if_one_answer(run, val)
    if stop.signum is not None:
        run.reporter.warning(f"{signal.Signals(stop.signum).name} arrived while the run was "
                             f"being saved; it was saved complete first.")
    return FinetuneResult(run.run_dir, run.splits.class_names, tuple(results), choice.kept,
                          tuple(run.history), scores, choice, calibration, test,
                          fitted_before_the_stages(run.record.candidates, False), refit)


def _share_record(run: Training) -> None:
    """Across workers: every worker takes the chief's record (its probe, checks and Plan),
    so all of them run the same stages, once each has checked that it reads the same
    images as the chief."""
    if run.cluster is None:
        return
    digest = hashlib.sha256(json.dumps(run.splits.rows()).encode()).hexdigest()
    chiefs = json.loads(share_text(run.strategy, json.dumps(
        {"record": run.record.to_dict(), "splits": digest}), run.cluster))
    if chiefs["splits"] != digest:
        raise DataError(f"This worker ({run.cluster.describe()}) reads other images or splits "
                        f"than the chief from '{run.config.data.data_dir}'. Every worker needs "
                        f"the same DATA folder (a shared or identical copy) and settings.")
    if not run.chief:
        run.record = save_record(run.run_dir, RunRecord.from_dict(chiefs["record"]))


def _candidate(run: Training, name: str) -> keras.Model:
    """The candidate model `name` (the probe or a stage's best): its weights restored into
    the classifier; or the saved model of a candidate fitted before the stages, or of the
    probe for a head with a hidden layer the probe cannot fill."""
    if run.record.candidate(name) is not None or (name == PROBE and run.config.dense_units):
        return load_keras_file(best_checkpoint(run.run_dir, name), "Start the run again with "
                               "--overwrite.")
    restore_best(run.model, run.run_dir, name)
    return run.model


def _choose_model(run: Training, results: list[StageResult]
                  ) -> tuple[keras.Model, Choice, np.ndarray]:
    """Scores every candidate on val and keeps the simplest one that no later one beats by
    more than noise (training.choice); returns it, the choice and its val probabilities."""
    val = run.splits.val
    ds = build_dataset(val.sources, None, run.record.image_size, run.batch)
    probabilities = {name: predict_batches(_candidate(run, name), ds, len(val), run.batch,
                                           run.reporter, f"Scoring the '{name}' model on val")
                     for name in (PROBE, *fitted_before_the_stages(run.record.candidates, True),
                                  *(r.name for r in results))}
    choice = choose({name: p.argmax(axis=1) == val.labels for name, p in probabilities.items()})
    if choice.comparisons:
        run.reporter.info(describe_choice(choice))
    return _candidate(run, choice.kept), choice, probabilities[choice.kept]


def _refit(run: Training, model: keras.Model, kept: str, results: Sequence[StageResult],
           stop: StopOnSignal) -> Refit | None:
    """Fits the kept model again on train and val together, so every label trains the saved
    model: the probe with its C chosen again by cross-validation there; a fine-tuned model
    from that probe, its stages trained again up to their kept epochs (training.loop's
    refit_stages). A candidate fitted before the stages, a head with a hidden layer the probe
    cannot start, and a run across workers keep their model as trained on train, as does a
    refit that a signal or a diverged loss ends."""
    started = time.perf_counter()
    fitted = kept == PROBE or any(r.name == kept for r in results)
    why = ("it was fitted before the stages" if not fitted else
           "its head has a hidden layer" if kept != PROBE and run.config.dense_units else
           "the stages ran across workers" if kept != PROBE and run.cluster is not None else "")
    if why:
        run.reporter.info(f"Not refitted on train + val: {why}, so the kept '{kept}' model "
                          f"stays as trained on train.")
        return None
    (x_train, y_train), (x_val, y_val) = run.frozen_features()
    probe = fit_probe(np.vstack([x_train, x_val]), np.r_[y_train, y_val],
                      len(run.splits.class_names), balanced=run.class_weights is not None,
                      seed=run.config.data.seed)
    if kept == PROBE:
        model.get_layer("head").get_layer(PREDICTIONS).set_weights([probe.kernel, probe.bias])
        images, epochs = len(x_train) + len(x_val), 0
        how = f"C={probe.c:g}"
    else:
        run.reporter.info(f"Refitting the kept '{kept}' model on train + val: its stages "
                          f"again, from the probe refitted there, each to its kept epoch.")
        try:
            with run.strategy.scope():
                images, epochs = refit_stages(run, results, kept, probe, stop)
        except (StopRequested, TrainingDiverged) as ended:
            run.reporter.warning(f"The refit stopped ({ended}); the kept '{kept}' model "
                                 f"stays as trained on train.")
            return None
        how = f"{epochs} epochs"
    seconds = time.perf_counter() - started
    held_out = "; test stays held out" if run.splits.test is not None and len(
        run.splits.test) else ""
    run.reporter.info(f"Refitted the '{kept}' model on train + val ({images} images, {how}; "
                      f"{seconds:.1f} s). Val chose it before the refit, so its val score "
                      f"below is of that model{held_out}.")
    return Refit(model=kept, images=images, seconds=round(seconds, 3), epochs=epochs)


def _calibrate_and_score(run: Training, model: keras.Model, choice: Choice, val: np.ndarray
                         ) -> tuple[Calibration, tuple[Score, ...], np.ndarray | None]:
    """Fits a temperature on val and folds it into the kept model; scores it with intervals
    on val (which chose it) and on DATA/test when there is one, which nothing was chosen or
    fitted on. Calibration changes no answer, only how sure each one is."""
    labels, test_split = run.splits.val.labels, run.splits.test
    temperature, skipped = _temperature(val, labels, run.reporter)
    fold_temperature(model.get_layer("head").get_layer(PREDICTIONS), temperature)
    values: dict[str, Any] = {
        "temperature": round(temperature, 4),
        "val_ece_before": expected_calibration_error(val, labels),
        "val_ece_after": expected_calibration_error(scale(val, temperature), labels)}
    scores = [Score.of("val", choice.val_correct[choice.kept], len(labels), chose=True)]
    test = None
    if test_split is not None and len(test_split):
        ds = build_dataset(test_split.sources, None, run.record.image_size, run.batch)
        test = predict_batches(model, ds, len(test_split), run.batch, run.reporter,
                               "Scoring the test split")
        correct = int((test.argmax(axis=1) == test_split.labels).sum())
        scores.append(Score.of("test", correct, len(test_split), chose=False))
        values["test_ece_before"] = expected_calibration_error(scale(test, 1 / temperature),
                                                               test_split.labels)
        values["test_ece_after"] = expected_calibration_error(test, test_split.labels)
    calibration = Calibration(**{k: round(v, 4) for k, v in values.items()}, skipped=skipped)
    if not skipped:
        run.reporter.info(f"Calibration: {calibration.describe()}.")
    return calibration, tuple(scores), test


def _novelty(run: Training, model: keras.Model, kept: str, val: np.ndarray
             ) -> NoveltyRecord | None:
    """Fits the kept model's "none of these" score (novelty.py) on train's features and
    val's, and writes RUN/novelty.npz. The probe's features are the cached frozen ones; any
    other model's come from one pass of it over train and val."""
    started = time.perf_counter()
    record = run.record.candidate(kept)
    if kept == PROBE or (record is not None and row(record.kind).own_features):
        # the frozen base: its head reads the cached features
        (x_train, _), (x_val, _) = run.frozen_features()
    else:
        both = with_features(model)
        x_train, x_val = (predict_batches(both, build_dataset(
            images.sources, None, run.record.image_size, run.batch), len(images), run.batch,
            run.reporter, f"Features of {name} for the novelty score")[0]
            for name, images in (("train", run.splits.train), ("val", run.splits.val)))
    novelty = fit_novelty(x_train, x_val, val, seed=run.config.data.seed)
    if novelty is None:
        run.reporter.info("No novelty score: val has too few images to set its threshold.")
        return None
    novelty.save(run.run_dir / NOVELTY_FILE)
    run.reporter.info(f"Novelty score fitted on {len(novelty.bank)} train images; its threshold "
                      f"passes {novelty.accept:.0%} of val: predict scores every image, and "
                      f"--reject-unknown labels those above it unknown.")
    return NoveltyRecord(k=novelty.k, threshold=round(novelty.threshold, 4),
                         accept=novelty.accept, bank=len(novelty.bank),
                         val_images=len(x_val),
                         seconds=round(time.perf_counter() - started, 3))


def _temperature(val: np.ndarray, labels: np.ndarray, reporter: Reporter) -> tuple[float, str]:
    """The temperature to fold into the kept model, or 1 and why val could not set one: a
    fit at the bound of its range (all of val right asks for ever more confidence), or one
    that would make the calibration error on val worse (a fit to a handful of images)."""
    temperature = fit_temperature(val, labels)
    right = int((val.argmax(axis=1) == labels).sum())
    if temperature is None:
        why = (f"the best temperature on val lies beyond the range tried: val ({right} of "
               f"{len(labels)} right) cannot say how much to change the probabilities")
    else:
        before = expected_calibration_error(val, labels)
        after = expected_calibration_error(scale(val, temperature), labels)
        if after <= before:
            return temperature, ""
        why = (f"the temperature fitted on val's {len(labels)} images ({temperature:.2f}) "
               f"would raise its expected calibration error ({before:.3f} -> {after:.3f})")
    reporter.info(f"Calibration skipped: {why}. The probabilities stay as the model gives "
                  f"them.")
    return 1.0, why


def _report(run: Training, model: keras.Model, val: np.ndarray, test: np.ndarray | None) -> None:
    """RUN/report.html: the record, the kept model on val and test, and a map of the
    frozen-base features (from the cache the probe filled; with --no-cache, no map)."""
    names, size = run.splits.class_names, run.record.image_size
    evaluated = [Evaluated("val (it chose the model)", run.splits.val, val, classification_metrics(
        run.splits.val.labels, val, names, split="val", chose=True), model, size)]
    if test is not None and run.splits.test is not None:
        evaluated.append(Evaluated("test (held out)", run.splits.test, test,
                                   classification_metrics(run.splits.test.labels, test, names,
                                                          split="test"), model, size))
    features = None
    if run.frozen is not None or run.config.cache:  # the probe's features; never a pass for a map
        (x_train, _), (x_val, _) = run.frozen_features()
        features = np.concatenate([x_train, x_val]), run.splits.train.join(run.splits.val)
    write_run_report(run.run_dir, run.record, evaluated, features)
    run.reporter.info(f"Wrote {run.run_dir / REPORT_FILE}.")
