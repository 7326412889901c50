"""The command line: options -> config -> one core call -> render.

TensorFlow and Keras load inside commands only, so `transferkit --help` answers at once.
"""

from __future__ import annotations

import contextlib
import sys
import tomllib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from transferkit import __version__
from transferkit.bases import BASES
from transferkit.config import (
    CLASS_WEIGHTS,
    EXPORT_FORMATS,
    INITS,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    QUANTIZATIONS,
    SCHEDULES,
    STRATEGIES,
    AugmentConfig,
    ComputeConfig,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
    OptimizerConfig,
    PredictConfig,
    ScheduleConfig,
    default,
)
from transferkit.errors import TransferkitError

app = typer.Typer(
    name="transferkit",
    help="Transfer learning on image folders: the Keras recipe, done right, in three commands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _choices(name: str, values: tuple[str, ...] | list[str]) -> type[Enum]:
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)  # type: ignore[misc]


Base = _choices("Base", list(BASES))
Pooling = _choices("Pooling", ("avg", "max"))
ExportFormat = _choices("ExportFormat", list(EXPORT_FORMATS))
Quantize = _choices("Quantize", QUANTIZATIONS)
Optimizer = _choices("Optimizer", OPTIMIZERS)
Schedule = _choices("Schedule", SCHEDULES)
Init = _choices("Init", INITS)
ClassWeight = _choices("ClassWeight", CLASS_WEIGHTS)
Monitor = _choices("Monitor", MONITORS)
Precision = _choices("Precision", PRECISIONS)
Strategy = _choices("Strategy", STRATEGIES)

DATA_PANEL, MODEL_PANEL, TRAIN_PANEL, OPT_PANEL, AUG_PANEL, CHECK_PANEL, OUT_PANEL = (
    "Data", "Base model", "Training", "Optimisation", "Augmentation (ImageDataGenerator units)",
    "Sanity checks", "Output")
COMPUTE_PANEL = "Hardware"


def _load_config_file(ctx: typer.Context, param: typer.CallbackParam,
                      path: Path | None) -> None:
    """--config FILE.toml: its settings become this command's defaults, so options given on
    the command line still win. Keys are option names (`learning_rate` or `learning-rate`)."""
    if path is None:
        return
    try:
        settings = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"cannot read '{path}': {exc}") from exc
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise typer.BadParameter(f"'{path}' has unknown setting(s) {', '.join(unknown)}; "
                                 f"valid ones are the command's options: "
                                 f"{', '.join(sorted(known))}.")
    ctx.default_map = {**(ctx.default_map or {}), **settings}


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file of option values (keys are option names); options given on "
                     "the command line override it.", callback=_load_config_file, is_eager=True,
    exists=True, dir_okay=False, rich_help_panel=OUT_PANEL, show_default=False)]
DataArg = Annotated[Path, typer.Argument(
    help="Folder with one sub-folder per class, or with train/ and val/ (and test/) folders "
         "of class sub-folders.", exists=False, file_okay=False, show_default=False)]
BaseOpt = Annotated[Base, typer.Option(
    "--base", help="Pretrained convolutional base.", rich_help_panel=MODEL_PANEL)]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", help="'imagenet', 'none' (random init) or a Keras weights file for the base.",
    rich_help_panel=MODEL_PANEL)]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", help="Square input size in pixels. Default: the base's.",
    rich_help_panel=DATA_PANEL, show_default=False)]
ValSplitOpt = Annotated[float, typer.Option(
    "--val-split", help="Fraction of each class held out for validation when DATA has no val/.",
    rich_help_panel=DATA_PANEL)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per batch.",
                                       rich_help_panel=DATA_PANEL)]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Seed for the split, shuffling, augmentation and initial weights.",
    rich_help_panel=DATA_PANEL)]
CacheOpt = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Reuse features (and image checks) computed before for "
                               "unchanged images; --no-cache recomputes everything.",
    rich_help_panel=DATA_PANEL)]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", help="auto: mixed float16 on GPUs with tensor cores (the softmax stays "
                        "float32); float32; mixed.", rich_help_panel=COMPUTE_PANEL)]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output instead of refusing.",
    rich_help_panel=OUT_PANEL)]
DropoutOpt = Annotated[float, typer.Option(
    "--dropout", help="Dropout before the softmax layer.", rich_help_panel=TRAIN_PANEL)]
L2Opt = Annotated[float, typer.Option(
    "--l2", help="L2 penalty on the head's weights (0: none).", rich_help_panel=TRAIN_PANEL)]
InitOpt = Annotated[Init, typer.Option(
    "--init", help="Head weight init: he, glorot, or auto (He for ReLU, Glorot for softmax).",
    rich_help_panel=TRAIN_PANEL)]

FINETUNE_BASE = Base(default(FinetuneConfig, "base"))
EXTRACT_BASE = Base(default(ExtractConfig, "base"))
EXTRACT_POOLING = Pooling(default(ExtractConfig, "pooling"))
STAGE1_SCHEDULE = Schedule(default(FinetuneConfig, "schedule").name)
STAGE2_SCHEDULE = Schedule(default(FinetuneConfig, "finetune_schedule").name)
FINETUNE_INIT = Init(default(FinetuneConfig, "init"))
HEAD_INIT = Init(default(HeadConfig, "init"))
DEFAULT_CLASS_WEIGHT = ClassWeight(default(FinetuneConfig, "class_weight"))
DEFAULT_MONITOR = Monitor(default(FinetuneConfig, "monitor"))
DEFAULT_OPTIMIZER = Optimizer(default(OptimizerConfig, "name"))
DEFAULT_PRECISION = Precision(default(ComputeConfig, "precision"))
DEFAULT_STRATEGY = Strategy(default(ComputeConfig, "strategy"))
EXPORT_FORMAT = ExportFormat(default(ExportConfig, "format"))
EXPORT_QUANTIZE = Quantize(default(ExportConfig, "quantize"))


def _augment_options(augment: bool, rotation_range: float, width_shift_range: float,
                     height_shift_range: float, shear_range: float, zoom_range: float,
                     horizontal_flip: bool, vertical_flip: bool,
                     brightness_range: tuple[float, float] | None) -> AugmentConfig:
    return AugmentConfig(augment, rotation_range, width_shift_range, height_shift_range,
                         shear_range, zoom_range, horizontal_flip, vertical_flip,
                         brightness_range)


AugmentOpt = Annotated[bool, typer.Option(
    "--augment/--no-augment", help="Augment training batches.", rich_help_panel=AUG_PANEL)]
RotationOpt = Annotated[float, typer.Option(
    "--rotation-range", help="Random rotation, degrees.", rich_help_panel=AUG_PANEL)]
WidthShiftOpt = Annotated[float, typer.Option(
    "--width-shift-range", help="Random horizontal shift, fraction of the width.",
    rich_help_panel=AUG_PANEL)]
HeightShiftOpt = Annotated[float, typer.Option(
    "--height-shift-range", help="Random vertical shift, fraction of the height.",
    rich_help_panel=AUG_PANEL)]
ShearOpt = Annotated[float, typer.Option(
    "--shear-range", help="Random shear angle, degrees.", rich_help_panel=AUG_PANEL)]
ZoomOpt = Annotated[float, typer.Option(
    "--zoom-range", help="Random zoom between 1-Z and 1+Z.", rich_help_panel=AUG_PANEL)]
HFlipOpt = Annotated[bool, typer.Option(
    "--horizontal-flip/--no-horizontal-flip", help="Random left-right flips.",
    rich_help_panel=AUG_PANEL)]
VFlipOpt = Annotated[bool, typer.Option(
    "--vertical-flip/--no-vertical-flip", help="Random up-down flips.",
    rich_help_panel=AUG_PANEL)]
BrightnessOpt = Annotated[tuple[float, float] | None, typer.Option(
    "--brightness-range", help="Random brightness factor between LOW and HIGH, e.g. 0.8 1.2.",
    rich_help_panel=AUG_PANEL, show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version,
        is_eager=True)] = False) -> None:
    """Transfer learning on image folders: doctor, finetune, extract, predict, evaluate."""


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Renders transferkit's errors once, without a traceback, and sets the exit code."""
    from transferkit.console import print_error

    try:
        yield
    except TransferkitError as exc:
        print_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print_error("Interrupted.")
        raise typer.Exit(130) from None


@app.command()
def finetune(
    data: Annotated[Path | None, typer.Argument(
        help="Folder with one sub-folder per class, or with train/ and val/ (and test/) "
             "folders of class sub-folders. Not needed with --resume.", exists=False,
        file_okay=False, show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Run directory to create.", rich_help_panel=OUT_PANEL,
        file_okay=False, show_default=False)] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue an interrupted run directory where it stopped, with its "
                         "saved settings.", rich_help_panel=OUT_PANEL, file_okay=False,
        show_default=False)] = None,
    config: ConfigOpt = None,
    base: BaseOpt = FINETUNE_BASE,
    weights: WeightsOpt = default(FinetuneConfig, "weights"),
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    val_split: ValSplitOpt = default(DataConfig, "val_split"),
    batch_size: BatchOpt = default(DataConfig, "batch_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    epochs: Annotated[int, typer.Option(
        "--epochs", help="Stage 1: most epochs training the new head on the frozen base.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "epochs"),
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", help="Stage 2: most epochs with the top blocks unfrozen (0: skip).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "finetune_epochs"),
    unfreeze_blocks: Annotated[int, typer.Option(
        "--unfreeze-blocks", help="Stage 2: how many blocks to unfreeze, from the top.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "unfreeze_blocks"),
    train_batchnorm: Annotated[bool, typer.Option(
        "--train-batchnorm/--freeze-batchnorm", help="Stage 2: let unfrozen BatchNorm layers "
                                                     "learn their scale and shift.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "train_batchnorm"),
    dense_units: Annotated[int, typer.Option(
        "--dense-units", help="Hidden ReLU units in the head (0: linear softmax head).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "dense_units"),
    dropout: DropoutOpt = default(FinetuneConfig, "dropout"),
    l2: L2Opt = default(FinetuneConfig, "l2"),
    init: InitOpt = FINETUNE_INIT,
    class_weight: Annotated[ClassWeight, typer.Option(
        "--class-weight", help="balanced, none, or auto (balanced beyond 1.5:1 imbalance).",
        rich_help_panel=TRAIN_PANEL)] = DEFAULT_CLASS_WEIGHT,
    monitor: Annotated[Monitor, typer.Option(
        "--monitor", help="Validation metric for early stopping, best epoch and rollback "
                          "(val_accuracy ties go to the lower val_loss).",
        rich_help_panel=TRAIN_PANEL)] = DEFAULT_MONITOR,
    patience: Annotated[int, typer.Option(
        "--patience", help="Stop a stage after this many epochs without improvement (0: never).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "patience"),
    optimizer: Annotated[Optimizer, typer.Option(
        "--optimizer", help="Optimizer for both stages.",
        rich_help_panel=OPT_PANEL)] = DEFAULT_OPTIMIZER,
    momentum: Annotated[float, typer.Option(
        "--momentum", help="Momentum (sgd, rmsprop).",
        rich_help_panel=OPT_PANEL)] = default(OptimizerConfig, "momentum"),
    nesterov: Annotated[bool, typer.Option(
        "--nesterov/--no-nesterov", help="Nesterov momentum (sgd).",
        rich_help_panel=OPT_PANEL)] = default(OptimizerConfig, "nesterov"),
    learning_rate: Annotated[float, typer.Option(
        "--learning-rate", help="Stage 1 learning rate.",
        rich_help_panel=OPT_PANEL)] = default(FinetuneConfig, "learning_rate"),
    finetune_lr: Annotated[float | None, typer.Option(
        "--finetune-lr", help="Stage 2 learning rate. Default: a tenth of --learning-rate, "
                              "so pretrained features survive.", rich_help_panel=OPT_PANEL,
        show_default=False)] = default(FinetuneConfig, "finetune_lr"),
    schedule: Annotated[Schedule, typer.Option(
        "--schedule", help="Stage 1 learning-rate schedule, stepped per epoch.",
        rich_help_panel=OPT_PANEL)] = STAGE1_SCHEDULE,
    finetune_schedule: Annotated[Schedule, typer.Option(
        "--finetune-schedule", help="Stage 2 learning-rate schedule.",
        rich_help_panel=OPT_PANEL)] = STAGE2_SCHEDULE,
    warmup_epochs: Annotated[int, typer.Option(
        "--warmup-epochs", help="Stage 1: epochs of linear warm-up.",
        rich_help_panel=OPT_PANEL)] = default(ScheduleConfig, "warmup_epochs"),
    finetune_warmup_epochs: Annotated[int, typer.Option(
        "--finetune-warmup-epochs", help="Stage 2: epochs of linear warm-up.",
        rich_help_panel=OPT_PANEL)] = default(ScheduleConfig, "warmup_epochs"),
    decay_rate: Annotated[float | None, typer.Option(
        "--decay-rate", help="step: factor per step (0.5); exponential: factor per epoch "
                             "(0.9); inverse-time: rate (0.5).", rich_help_panel=OPT_PANEL,
        show_default=False)] = default(ScheduleConfig, "decay_rate"),
    decay_epochs: Annotated[int | None, typer.Option(
        "--decay-epochs", help="step: epochs per step (default: a third of the stage).",
        rich_help_panel=OPT_PANEL, show_default=False)] = default(ScheduleConfig,
                                                                  "decay_epochs"),
    augment: AugmentOpt = default(AugmentConfig, "enabled"),
    rotation_range: RotationOpt = default(AugmentConfig, "rotation_range"),
    width_shift_range: WidthShiftOpt = default(AugmentConfig, "width_shift_range"),
    height_shift_range: HeightShiftOpt = default(AugmentConfig, "height_shift_range"),
    shear_range: ShearOpt = default(AugmentConfig, "shear_range"),
    zoom_range: ZoomOpt = default(AugmentConfig, "zoom_range"),
    horizontal_flip: HFlipOpt = default(AugmentConfig, "horizontal_flip"),
    vertical_flip: VFlipOpt = default(AugmentConfig, "vertical_flip"),
    brightness_range: BrightnessOpt = default(AugmentConfig, "brightness_range"),
    overfit_check: Annotated[bool, typer.Option(
        "--overfit-check", help="Only check that the head can memorise two batches (~100 % "
                                "training accuracy), then exit 0 (passed) or 1.",
        rich_help_panel=CHECK_PANEL)] = False,
    lr_find: Annotated[bool, typer.Option(
        "--lr-find", help="Run a learning-rate range test first, save lr_find.png, and train "
                          "stage 1 at its suggestion.",
        rich_help_panel=CHECK_PANEL)] = default(FinetuneConfig, "lr_find"),
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Also write TensorBoard logs to RUN/tensorboard.",
        rich_help_panel=OUT_PANEL)] = default(FinetuneConfig, "tensorboard"),
    cache: CacheOpt = default(FinetuneConfig, "cache"),
    precision: PrecisionOpt = DEFAULT_PRECISION,
    jit: Annotated[bool, typer.Option(
        "--jit/--no-jit", help="XLA-compile the training steps.",
        rich_help_panel=COMPUTE_PANEL)] = default(ComputeConfig, "jit"),
    strategy: Annotated[Strategy, typer.Option(
        "--strategy", help="none; mirrored (all local GPUs); multiworker (machines in "
                           "TF_CONFIG); auto: mirrored with several GPUs. --batch-size is per "
                           "device.", rich_help_panel=COMPUTE_PANEL)] = DEFAULT_STRATEGY,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a new head on a frozen pretrained base, then fine-tune its top blocks.

    With --no-augment, stage 1 trains the head on frozen-base features computed once (and
    cached), which is many times faster than pushing every image through the base each epoch.
    """
    from transferkit.console import RichReporter, render_finetune

    if resume is not None:
        if data is not None or output is not None:
            raise typer.BadParameter("--resume takes the data folder and settings from the run "
                                     "directory; do not pass DATA or -o with it.")
        with _user_errors():
            from transferkit.training import resume_finetune

            render_finetune(resume_finetune(resume, RichReporter()))
        return
    if data is None or (output is None and not overfit_check):
        raise typer.BadParameter("Pass the DATA folder and -o RUN (or --resume RUN).")
    with _user_errors():
        settings = FinetuneConfig(
            data=DataConfig(data, image_size, val_split, batch_size, seed),
            output=output, base=base.value, weights=weights, epochs=epochs,
            learning_rate=learning_rate, finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr, unfreeze_blocks=unfreeze_blocks,
            train_batchnorm=train_batchnorm,
            optimizer=OptimizerConfig(optimizer.value, momentum, nesterov),
            schedule=ScheduleConfig(schedule.value, warmup_epochs, decay_rate, decay_epochs),
            finetune_schedule=ScheduleConfig(finetune_schedule.value, finetune_warmup_epochs,
                                             decay_rate, decay_epochs),
            dropout=dropout, l2=l2, dense_units=dense_units, init=init.value,
            class_weight=class_weight.value, monitor=monitor.value, patience=patience,
            augment=_augment_options(augment, rotation_range, width_shift_range,
                                     height_shift_range, shear_range, zoom_range,
                                     horizontal_flip, vertical_flip, brightness_range),
            tensorboard=tensorboard, lr_find=lr_find, cache=cache,
            compute=ComputeConfig(precision.value, jit, strategy.value), overwrite=overwrite,
        )
        if overfit_check:
            from transferkit.console import render_overfit
            from transferkit.training.checks import overfit_check as run_overfit_check

            result = run_overfit_check(settings, RichReporter())
            render_overfit(result)
        else:
            from transferkit.training import finetune as run_finetune

            render_finetune(run_finetune(settings, RichReporter()))
    if overfit_check and not result.passed:
        raise typer.Exit(1)


@app.command()
def extract(
    data: DataArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Feature file to write (.npz).", rich_help_panel=OUT_PANEL,
        dir_okay=False, show_default=False)],
    config: ConfigOpt = None,
    base: BaseOpt = EXTRACT_BASE,
    weights: WeightsOpt = default(ExtractConfig, "weights"),
    blocks: Annotated[int | None, typer.Option(
        "--blocks", help="Use only the base's first N blocks (lower layers transfer better to "
                         "data far from ImageNet). Default: all.",
        rich_help_panel=MODEL_PANEL, show_default=False)] = default(ExtractConfig, "blocks"),
    pooling: Annotated[Pooling, typer.Option(
        "--pooling", help="Global pooling of the feature maps.",
        rich_help_panel=MODEL_PANEL)] = EXTRACT_POOLING,
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    val_split: ValSplitOpt = default(DataConfig, "val_split"),
    batch_size: BatchOpt = default(DataConfig, "batch_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    train_head: Annotated[Path | None, typer.Option(
        "--train-head", help="Also train a dense classifier on the features and save it as a "
                             "run directory usable by `predict`.",
        rich_help_panel=TRAIN_PANEL, file_okay=False, show_default=False)] = None,
    dense_units: Annotated[int, typer.Option(
        "--dense-units", help="Hidden units of the classifier (0: linear).",
        rich_help_panel=TRAIN_PANEL)] = default(HeadConfig, "dense_units"),
    dropout: DropoutOpt = default(HeadConfig, "dropout"),
    l2: L2Opt = default(HeadConfig, "l2"),
    init: InitOpt = HEAD_INIT,
    head_epochs: Annotated[int, typer.Option(
        "--head-epochs", help="Most epochs of classifier training; the best (by val_loss) is "
                              "kept.", rich_help_panel=TRAIN_PANEL)] = default(HeadConfig,
                                                                               "epochs"),
    learning_rate: Annotated[float, typer.Option(
        "--learning-rate", help="Classifier learning rate (Adam).",
        rich_help_panel=TRAIN_PANEL)] = default(HeadConfig, "learning_rate"),
    precision: PrecisionOpt = DEFAULT_PRECISION,
    cache: CacheOpt = default(ExtractConfig, "cache"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the frozen base over every image and save the features (and train a classifier).

    Features are cached by base, weights, size, cut point and each file's content: a re-run
    computes only new or edited images.
    """
    with _user_errors():
        head = None if train_head is None else HeadConfig(
            train_head, dense_units, dropout, head_epochs, learning_rate, l2, init.value,
            overwrite=overwrite)
        settings = ExtractConfig(
            data=DataConfig(data, image_size, val_split, batch_size, seed), output=output,
            base=base.value, weights=weights, blocks=blocks, pooling=pooling.value,
            precision=precision.value, cache=cache, overwrite=overwrite, head=head)
        from transferkit.console import RichReporter, render_extract
        from transferkit.extract import extract as run_extract

        render_extract(run_extract(settings, RichReporter()))


def _paths_with_stdin(paths: list[Path]) -> tuple[Path, ...]:
    """The paths given, with `-` replaced by the non-empty lines of stdin."""
    expanded: list[Path] = []
    for path in paths:
        if str(path) == "-":
            expanded += [Path(line.strip()) for line in sys.stdin if line.strip()]
        else:
            expanded.append(path)
    return tuple(expanded)


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(
        help="Run directory written by finetune or extract --train-head.", exists=False,
        file_okay=False, show_default=False)],
    paths: Annotated[list[Path], typer.Argument(
        help="Image files, folders (searched recursively) or quoted glob patterns such as "
             "'shots/**/*.jpg'; - reads one path per line from stdin.", show_default=False)],
    top_k: Annotated[int, typer.Option(
        "--top-k", help="How many labels to list per image.",
        rich_help_panel=OUT_PANEL)] = default(PredictConfig, "top_k"),
    tta: Annotated[bool, typer.Option(
        "--tta", help="Test-time augmentation: average over ten views (four corner crops and "
                      "the centre crop, each also mirrored); reports how much it changed.",
        rich_help_panel=MODEL_PANEL)] = default(PredictConfig, "tta"),
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="Label images whose top probability is below P 'unknown' (the "
                            "best guess is kept in the output file).", metavar="P",
        rich_help_panel=MODEL_PANEL, show_default=False)] = default(PredictConfig, "threshold"),
    batch_size: BatchOpt = default(PredictConfig, "batch_size"),
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write predictions to a .csv, .json or .jsonl file instead of "
                               "a table.",
        rich_help_panel=OUT_PANEL, dir_okay=False, show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Predict labels for image files and folders."""
    with _user_errors():
        settings = PredictConfig(run, _paths_with_stdin(paths), top_k, batch_size, output,
                                 overwrite, tta, threshold)
        from transferkit.artifacts import save_predictions
        from transferkit.console import (
            RichReporter,
            render_prediction_summary,
            render_predictions,
        )
        from transferkit.predict import predict as run_predict

        report = run_predict(settings, RichReporter())
        if output is None:
            render_predictions(report, settings.top_k)
        else:
            save_predictions(output, [p.to_dict() for p in report.predictions], settings.top_k,
                             overwrite)
        render_prediction_summary(report)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(
        help="Run directory to evaluate.", exists=False, file_okay=False, show_default=False)],
    data: Annotated[Path | None, typer.Argument(
        help="A labelled folder (class sub-folders named like the run's classes). Default: "
             "the run's validation split.", exists=False, file_okay=False,
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for metrics.json, confusion.png and mistakes.png. "
                               "Default: RUN/evaluation.", rich_help_panel=OUT_PANEL,
        file_okay=False, show_default=False)] = None,
    top_k: Annotated[int, typer.Option(
        "--top-k", help="Also report top-k accuracy for this k.",
        rich_help_panel=OUT_PANEL)] = default(EvaluateConfig, "top_k"),
    gallery: Annotated[int, typer.Option(
        "--gallery", help="How many of the most confidently wrong images to show.",
        rich_help_panel=OUT_PANEL)] = default(EvaluateConfig, "gallery"),
    batch_size: BatchOpt = default(EvaluateConfig, "batch_size"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Accuracy, top-k, per-class precision/recall/F1, confusion matrix, worst mistakes."""
    with _user_errors():
        settings = EvaluateConfig(run, data, output, top_k, batch_size, gallery, overwrite)
        from transferkit.console import RichReporter, render_evaluation
        from transferkit.evaluate import evaluate as run_evaluate

        render_evaluation(run_evaluate(settings, RichReporter()))


@app.command("augment-preview")
def augment_preview(
    data: DataArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="PNG file to write.", rich_help_panel=OUT_PANEL,
        dir_okay=False, show_default=False)],
    config: ConfigOpt = None,
    images: Annotated[int, typer.Option(
        "--images", help="How many training images (one per row).",
        rich_help_panel=OUT_PANEL)] = 4,
    variants: Annotated[int, typer.Option(
        "--variants", help="Augmented draws per image, after the original.",
        rich_help_panel=OUT_PANEL)] = 6,
    base: BaseOpt = FINETUNE_BASE,
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    augment: AugmentOpt = default(AugmentConfig, "enabled"),
    rotation_range: RotationOpt = default(AugmentConfig, "rotation_range"),
    width_shift_range: WidthShiftOpt = default(AugmentConfig, "width_shift_range"),
    height_shift_range: HeightShiftOpt = default(AugmentConfig, "height_shift_range"),
    shear_range: ShearOpt = default(AugmentConfig, "shear_range"),
    zoom_range: ZoomOpt = default(AugmentConfig, "zoom_range"),
    horizontal_flip: HFlipOpt = default(AugmentConfig, "horizontal_flip"),
    vertical_flip: VFlipOpt = default(AugmentConfig, "vertical_flip"),
    brightness_range: BrightnessOpt = default(AugmentConfig, "brightness_range"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Save a grid of augmented versions of a few training images, to judge the augmentation."""
    with _user_errors():
        settings = _augment_options(augment, rotation_range, width_shift_range,
                                    height_shift_range, shear_range, zoom_range,
                                    horizontal_flip, vertical_flip, brightness_range)
        from transferkit.console import RichReporter, stderr
        from transferkit.training.checks import preview_augmentation

        preview_augmentation(data, output, settings, base.value, image_size, images, variants,
                             seed, overwrite, RichReporter())
        stderr.print(f"Wrote {images} image(s) x {variants} augmented draws to '{output}'.")


@app.command()
def doctor(
    data: DataArg,
    base: BaseOpt = FINETUNE_BASE,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write the full report as JSON.", rich_help_panel=OUT_PANEL,
        dir_okay=False, show_default=False)] = None,
    quarantine: Annotated[Path | None, typer.Option(
        "--quarantine", help="Move (never delete) unusable files into this folder, keeping "
                             "their relative paths.", rich_help_panel=OUT_PANEL,
        file_okay=False, show_default=False)] = None,
    cache: CacheOpt = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Check a data folder: decode every file, find bad, mislabelled and duplicate images.

    Exits 0 when the folder is clean and 1 when problems were found.
    """
    with _user_errors():
        from transferkit.artifacts import check_new_output, save_report
        from transferkit.bases import get_base
        from transferkit.console import RichReporter, render_doctor, render_quarantine
        from transferkit.doctor import diagnose
        from transferkit.doctor import quarantine as move_unusable

        if output is not None:
            check_new_output(output, overwrite, what="output file")
        report = diagnose(data, get_base(base.value).min_size, RichReporter(), cache)
        render_doctor(report)
        if output is not None:
            save_report(output, report.to_dict(), overwrite)
        if quarantine is not None:
            render_quarantine(move_unusable(report, quarantine), quarantine)
    if not report.clean:
        raise typer.Exit(1)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(
        help="Run directory written by finetune or extract --train-head.", exists=False,
        file_okay=False, show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="SavedModel folder, or .tflite / .onnx file, to write.",
        rich_help_panel=OUT_PANEL, show_default=False)],
    export_format: Annotated[ExportFormat, typer.Option(
        "--format", help="savedmodel (TensorFlow Serving, TF.js converters); tflite "
                         "(phones, microcontrollers); onnx (ONNX Runtime and most runtimes; "
                         "needs transferkit[onnx]).",
        rich_help_panel=OUT_PANEL)] = EXPORT_FORMAT,
    quantize: Annotated[Quantize, typer.Option(
        "--quantize", help="TFLite only: float16 halves the size; dynamic stores int8 weights; "
                           "int8 is fully integer, calibrated on the run's training images.",
        rich_help_panel=OUT_PANEL)] = EXPORT_QUANTIZE,
    check_images: Annotated[int, typer.Option(
        "--check-images", help="Images run through both the export and the Keras model to "
                               "compare their outputs.",
        rich_help_panel=OUT_PANEL)] = default(ExportConfig, "check_images"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a run's model (preprocessing included) and check it against Keras."""
    with _user_errors():
        settings = ExportConfig(run, output, export_format.value, quantize.value, check_images,
                                overwrite)
        from transferkit.console import RichReporter, render_export
        from transferkit.export import export as run_export

        render_export(run_export(settings, RichReporter()))


@app.command("bases")
def bases_command(
    name: Annotated[Base | None, typer.Argument(
        help="Show this base's blocks.", show_default=False)] = None,
) -> None:
    """List the pretrained bases: size, blocks, input scaling, offline ImageNet weights."""
    from transferkit.console import render_base, render_bases

    if name is None:
        render_bases(list(BASES.values()))
    else:
        render_base(BASES[name.value])


@app.command("cache")
def cache_command(
    clear: Annotated[bool, typer.Option(
        "--clear", help="Delete cached features and converted images (rebuilt when needed).",
        rich_help_panel=OUT_PANEL)] = False,
    weights: Annotated[bool, typer.Option(
        "--weights", help="With --clear, also delete the converted ImageNet weights.",
        rich_help_panel=OUT_PANEL)] = False,
) -> None:
    """Show what transferkit caches (features, converted images, weights), or clear it."""
    with _user_errors():
        from transferkit.artifacts import cache_usage, clear_cache
        from transferkit.atomic import cache_dir
        from transferkit.console import render_cache

        if clear:
            clear_cache(("features", "converted", "weights") if weights
                        else ("features", "converted"))
        render_cache(cache_dir(), cache_usage())


def main() -> None:
    """Console-script entry point."""
    app()

