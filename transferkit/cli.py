"""The command line: options -> config -> one core call -> render.

TensorFlow and Keras load inside commands only, so `transferkit --help` answers at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import sys
import tomllib
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from transferkit import __version__
from transferkit.bases import BASES, get_base, resolve_image_size
from transferkit.config import (
    CLASS_WEIGHTS,
    INITS,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    PREDICTION_FORMATS,
    QUANTIZATIONS,
    SCHEDULES,
    STRATEGIES,
    AuditConfig,
    AugmentConfig,
    ComputeConfig,
    CVConfig,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
    OptimizerConfig,
    PredictConfig,
    PreviewConfig,
    ScheduleConfig,
    default,
)
from transferkit.errors import ConfigError, TransferkitError
from transferkit.export import FORMATS
from transferkit.quiet import load_tensorflow, set_verbose

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
AUTO_BASE = "auto"  # finetune: the best base of `bases --rank` on the data
FinetuneBase = _choices("FinetuneBase", [AUTO_BASE, *BASES])
Pooling = _choices("Pooling", ("avg", "max"))
ExportFormat = _choices("ExportFormat", list(FORMATS))
PredictionFormat = _choices("PredictionFormat", PREDICTION_FORMATS)
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
UnfreezeOpt = Annotated[int | None, typer.Option(
    "--unfreeze-blocks", help="Stage 2: how many blocks to unfreeze, from the top. Default: "
                              "2, or every block when --adapt finds the data unlike the "
                              "base's pretraining.", rich_help_panel=TRAIN_PANEL,
    show_default=False)]
AdaptOpt = Annotated[bool, typer.Option(
    "--adapt/--no-adapt", help="Decide from the training data, in seconds, whether to "
                               "fine-tune every block (raw pixels rival the frozen features) "
                               "and whether to drop left-right flips (they change labels). "
                               "--no-adapt: the top 2 blocks and the flips as given.",
    rich_help_panel=TRAIN_PANEL)]
DropoutOpt = Annotated[float, typer.Option(
    "--dropout", help="Dropout before the softmax layer.", rich_help_panel=TRAIN_PANEL)]
L2Opt = Annotated[float, typer.Option(
    "--l2", help="L2 penalty on the head's weights (0: none).", rich_help_panel=TRAIN_PANEL)]
InitOpt = Annotated[Init, typer.Option(
    "--init", help="Head weight init: he, glorot, or auto (He for ReLU, Glorot for softmax).",
    rich_help_panel=TRAIN_PANEL)]

AUGMENT_DEFAULTS = AugmentConfig()
FINETUNE_BASE = Base(default(FinetuneConfig, "base"))
FINETUNE_BASE_OR_AUTO = FinetuneBase(default(FinetuneConfig, "base"))
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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version,
        is_eager=True)] = False,
          verbose: Annotated[bool, typer.Option(
        "--verbose", help="Also show TensorFlow's own log lines (also: TRANSFERKIT_VERBOSE=1).",
    )] = False) -> None:
    """Transfer learning on image folders: doctor, finetune, extract, predict, evaluate."""
    set_verbose(verbose)
    # A file name that is not valid UTF-8 is printed as its own bytes, as `ls` does, instead
    # of failing the command (stderr already escapes them).
    with contextlib.suppress(AttributeError, io.UnsupportedOperation):
        sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Renders transferkit's errors once, without a traceback, and sets the exit code."""
    from transferkit.console import print_error

    try:
        yield
    except TransferkitError as exc:
        print_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        from transferkit.files import describe_write_error

        message = describe_write_error(exc)
        if message is None:
            raise
        print_error(message)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print_error("Interrupted.")
        raise typer.Exit(130) from None


def _check_data(data: DataConfig, base: str) -> None:
    """The checks on a data folder and image size that need no TensorFlow, so mistakes are
    reported at once."""
    from transferkit.data.folders import check_data_folder

    resolve_image_size(get_base(base), data.image_size)
    check_data_folder(data.data_dir)


def with_options(cls: type, name: str, panel: str) -> Callable[[Callable], Callable]:
    """Adds the fields of config dataclass `cls` (those declared with config.option) to a
    command as options, and hands the command one `cls` built from them as `name`. The
    options are declared once, in the config, for every command that takes them."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    def flag(f: dataclasses.Field) -> str:
        dashed = f.name.replace("_", "-")
        return f.metadata["flag"] or (f"--{dashed}/--no-{dashed}" if hints[f.name] in (
            bool, bool | None) else f"--{dashed}")

    def param(f: dataclasses.Field) -> str:  # the option's name, also its --config key
        return flag(f).split("/")[0].removeprefix("--").replace("-", "_")

    added = {f.name: inspect.Parameter(param(f), inspect.Parameter.KEYWORD_ONLY,
                                       default=f.default, annotation=Annotated[
                                           hints[f.name], typer.Option(
                                               flag(f), help=f.metadata["help"],
                                               rich_help_panel=panel,
                                               show_default=f.default is not None)])
             for f in fields}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {field: kwargs.pop(p.name) for field, p in added.items()}
            with _user_errors():  # an out-of-range value is a usage error, not a traceback
                built = cls(**values)
            return command(*args, **kwargs, **{name: built})

        kept = [p for p in signature.parameters.values() if p.name != name]
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*kept, *added.values()])
        return wrapper

    return decorate


@app.command()
@with_options(AugmentConfig, "augmentation", AUG_PANEL)
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
    base: Annotated[FinetuneBase, typer.Option(
        "--base", help="Pretrained convolutional base; auto: the best of `transferkit bases "
                       "--rank DATA` (a probe on each available base's features).",
        rich_help_panel=MODEL_PANEL)] = FINETUNE_BASE_OR_AUTO,
    weights: WeightsOpt = default(FinetuneConfig, "weights"),
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    val_split: ValSplitOpt = default(DataConfig, "val_split"),
    batch_size: BatchOpt = default(DataConfig, "batch_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    epochs: Annotated[int, typer.Option(
        "--epochs", help="Most epochs training the head further on the frozen base, with "
                  "augmentation, after the linear probe gave it its weights (0: skip).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "epochs"),
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", help="Stage 2: most epochs with the top blocks unfrozen (0: skip).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "finetune_epochs"),
    unfreeze_blocks: UnfreezeOpt = default(FinetuneConfig, "unfreeze_blocks"),
    adapt: AdaptOpt = default(FinetuneConfig, "adapt"),
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
        "--strategy", help="none; mirrored (all local GPUs); auto: mirrored with several "
                           "GPUs. --batch-size is per device. (multiworker: not available with "
                           "Keras 3; the error says why.)",
        rich_help_panel=COMPUTE_PANEL)] = DEFAULT_STRATEGY,
    overwrite: OverwriteOpt = False,
    augmentation: AugmentConfig = AUGMENT_DEFAULTS,  # from with_options
) -> None:
    """Train a new head on a frozen pretrained base, then fine-tune its top blocks.

    With --no-augment, stage 1 trains the head on frozen-base features computed once (and
    cached), which is many times faster than pushing every image through the base each epoch.
    """
    with _user_errors():
        if resume is not None:
            _resume(resume, data, output)
            return
        if data is None or (output is None and not overfit_check):
            raise ConfigError("Pass the DATA folder and -o RUN (or --resume RUN).")
        schedules = {"decay_rate": decay_rate, "decay_epochs": decay_epochs}
        settings = FinetuneConfig(
            data=DataConfig(data_dir=data, image_size=image_size, val_split=val_split,
                            batch_size=batch_size, seed=seed),
            output=output, base=default(FinetuneConfig, "base") if base.value == AUTO_BASE
            else base.value, weights=weights, epochs=epochs,
            learning_rate=learning_rate, finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr, unfreeze_blocks=unfreeze_blocks, adapt=adapt,
            train_batchnorm=train_batchnorm,
            optimizer=OptimizerConfig(name=optimizer.value, momentum=momentum,
                                      nesterov=nesterov),
            schedule=ScheduleConfig(name=schedule.value, warmup_epochs=warmup_epochs,
                                    **schedules),
            finetune_schedule=ScheduleConfig(name=finetune_schedule.value,
                                             warmup_epochs=finetune_warmup_epochs, **schedules),
            dropout=dropout, l2=l2, dense_units=dense_units, init=init.value,
            class_weight=class_weight.value, monitor=monitor.value, patience=patience,
            augment=augmentation,
            tensorboard=tensorboard, lr_find=lr_find, cache=cache,
            compute=ComputeConfig(precision=precision.value, jit=jit, strategy=strategy.value),
            overwrite=overwrite)
        if base.value == AUTO_BASE and weights != default(FinetuneConfig, "weights"):
            raise ConfigError(f"--base auto ranks the bases by their ImageNet weights; got "
                              f"--weights {weights}. Name the base that fits those weights.")
        _check_data(settings.data, settings.base)
        if finetune_epochs:
            get_base(settings.base).check_block_count(unfreeze_blocks, "--unfreeze-blocks")
        if output is not None:
            from transferkit.runs import check_run_output

            check_run_output(output, overwrite)
        load_tensorflow()
        from transferkit.console import RichReporter, render_finetune, render_overfit

        if base.value == AUTO_BASE:
            from transferkit.console import render_ranks
            from transferkit.ranking import rank_bases

            ranks = rank_bases(settings.data, RichReporter(), settings.cache)
            render_ranks(ranks)
            settings = dataclasses.replace(settings, base=ranks[0].base)
            if finetune_epochs:
                get_base(settings.base).check_block_count(unfreeze_blocks, "--unfreeze-blocks")

        if overfit_check:
            from transferkit.training.checks import overfit_check as run_overfit_check

            result = run_overfit_check(settings, RichReporter())
            render_overfit(result)
            if not result.passed:
                raise typer.Exit(1)
        else:
            from transferkit.training.finetune import finetune as run_finetune

            render_finetune(run_finetune(settings, RichReporter()))


def _resume(run_dir: Path, data: Path | None, output: Path | None) -> None:
    """finetune --resume RUN: the run directory is read (and refused) before TensorFlow."""
    from transferkit.runs import read_record

    if data is not None or output is not None:
        raise ConfigError("--resume takes the data folder and settings from the run "
                          "directory; do not pass DATA or -o with it.")
    read_record(run_dir, finished=False)
    load_tensorflow()
    from transferkit.console import RichReporter, render_finetune
    from transferkit.training.finetune import resume_finetune

    render_finetune(resume_finetune(run_dir, RichReporter()))


@app.command()
def cv(
    data: DataArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Run directory for the K-fold ensemble (its folds go in "
                               "RUN/folds).", rich_help_panel=OUT_PANEL, file_okay=False,
        show_default=False)],
    folds: Annotated[int, typer.Option(
        "--folds", help="K: how many stratified folds.",
        rich_help_panel=TRAIN_PANEL)] = default(CVConfig, "folds"),
    config: ConfigOpt = None,
    base: BaseOpt = FINETUNE_BASE,
    weights: WeightsOpt = default(FinetuneConfig, "weights"),
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    val_split: Annotated[float, typer.Option(
        "--val-split", help="Share of each fold's training images held out to choose its "
                            "epochs and model.", rich_help_panel=DATA_PANEL)] = default(
        DataConfig, "val_split"),
    batch_size: BatchOpt = default(DataConfig, "batch_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    epochs: Annotated[int, typer.Option(
        "--epochs", help="Head epochs on the frozen base after the probe (0: skip).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "epochs"),
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", help="Most epochs with the top blocks unfrozen (0: the probe "
                                  "alone).", rich_help_panel=TRAIN_PANEL)] = default(
        FinetuneConfig, "finetune_epochs"),
    unfreeze_blocks: UnfreezeOpt = default(FinetuneConfig, "unfreeze_blocks"),
    adapt: AdaptOpt = default(FinetuneConfig, "adapt"),
    cache: CacheOpt = default(FinetuneConfig, "cache"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Cross-validate the finetune recipe: K stratified folds, an out-of-fold prediction for
    every image (oof.csv), each fold's held-out accuracy with its interval, and the K fold
    models saved as one averaged model that predict, evaluate and export take.

    train/ and val/ are pooled; test/ stays out, and the ensemble is scored on it.
    """
    with _user_errors():
        settings = CVConfig(folds=folds, recipe=FinetuneConfig(
            data=DataConfig(data_dir=data, image_size=image_size, val_split=val_split,
                            batch_size=batch_size, seed=seed),
            output=output, base=base.value, weights=weights, epochs=epochs,
            finetune_epochs=finetune_epochs, unfreeze_blocks=unfreeze_blocks, adapt=adapt,
            cache=cache,
            overwrite=overwrite))
        _check_data(settings.recipe.data, settings.recipe.base)
        if finetune_epochs:
            get_base(settings.recipe.base).check_block_count(unfreeze_blocks,
                                                             "--unfreeze-blocks")
        from transferkit.runs import check_run_output

        check_run_output(output, overwrite)
        load_tensorflow()
        from transferkit.console import RichReporter, render_cv
        from transferkit.cv import cross_validate

        render_cv(cross_validate(settings, RichReporter()))


@app.command()
def audit(
    data: DataArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder for audit.json and report.html.",
        rich_help_panel=OUT_PANEL, file_okay=False, show_default=False)],
    base: BaseOpt = FINETUNE_BASE,
    weights: WeightsOpt = default(AuditConfig, "weights"),
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    val_split: ValSplitOpt = default(DataConfig, "val_split"),
    batch_size: BatchOpt = default(DataConfig, "batch_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    duplicate_similarity: Annotated[float, typer.Option(
        "--duplicate-similarity", help="Perceptual similarity (correlation of thumbnails, "
                                       "aligned over small crops) from which two images count "
                                       "as near-duplicates.",
        rich_help_panel=CHECK_PANEL)] = default(AuditConfig, "duplicate_similarity"),
    cache: CacheOpt = default(AuditConfig, "cache"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Find likely label errors, near-duplicates (and leaks between splits) and outliers,
    from frozen-base features; write audit.json and a self-contained report.html. Never moves
    or edits the data."""
    with _user_errors():
        settings = AuditConfig(
            data=DataConfig(data_dir=data, image_size=image_size, val_split=val_split,
                            batch_size=batch_size, seed=seed),
            output=output, base=base.value, weights=weights,
            duplicate_similarity=duplicate_similarity, cache=cache, overwrite=overwrite)
        _check_data(settings.data, settings.base)
        from transferkit.files import check_new_output

        check_new_output(output, overwrite, what="audit folder")
        load_tensorflow()
        from transferkit.audit import audit as run_audit
        from transferkit.console import RichReporter, render_audit

        render_audit(run_audit(settings, RichReporter()))


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
            output=train_head, dense_units=dense_units, dropout=dropout, epochs=head_epochs,
            learning_rate=learning_rate, l2=l2, init=init.value, overwrite=overwrite)
        settings = ExtractConfig(
            data=DataConfig(data_dir=data, image_size=image_size, val_split=val_split,
                            batch_size=batch_size, seed=seed),
            output=output, base=base.value, weights=weights, blocks=blocks,
            pooling=pooling.value, precision=precision.value, cache=cache, overwrite=overwrite,
            head=head)
        from transferkit.files import check_new_output
        from transferkit.runs import check_run_output

        _check_data(settings.data, settings.base)
        if blocks is not None:
            get_base(settings.base).check_block_count(blocks, "--blocks")
        check_new_output(output, overwrite, what="feature file")
        if train_head is not None:
            check_run_output(train_head, overwrite)
        load_tensorflow()
        from transferkit.console import RichReporter, render_extract
        from transferkit.extract import extract as run_extract

        render_extract(run_extract(settings, RichReporter()))


def _paths_with_stdin(paths: list[Path]) -> tuple[Path, ...]:
    """The paths given, with `-` replaced by the non-empty lines of stdin (only the line end
    is removed: a file name may begin or end with a space)."""
    expanded: list[Path] = []
    for path in paths:
        if str(path) == "-":
            names = (line.rstrip("\r\n") for line in sys.stdin)
            expanded += [Path(name) for name in names if name.strip()]
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
        "--output", "-o", help="Write predictions to a .csv, .json or .jsonl file, or to "
                               "stdout with -o -. Without it: a table on a terminal, CSV when "
                               "stdout is a pipe or file.",
        rich_help_panel=OUT_PANEL, dir_okay=False, allow_dash=True,
        show_default=False)] = None,
    output_format: Annotated[PredictionFormat | None, typer.Option(
        "--format", help="csv, json or jsonl. Default: from the -o file's suffix; csv for "
                         "stdout.", rich_help_panel=OUT_PANEL, show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Predict labels for image files and folders."""
    with _user_errors():
        settings = PredictConfig(
            run_dir=run, paths=_paths_with_stdin(paths), top_k=top_k, batch_size=batch_size,
            output=output, format=None if output_format is None else output_format.value,
            overwrite=overwrite, tta=tta, threshold=threshold)
        from transferkit.console import stdout
        from transferkit.files import check_new_output
        from transferkit.runs import read_record

        read_record(run)
        writes_file = output is not None and str(output) != "-"
        if writes_file:
            check_new_output(output, overwrite)
        load_tensorflow()
        from transferkit.console import (
            RichReporter,
            render_prediction_summary,
            render_predictions,
        )
        from transferkit.files import write_text
        from transferkit.predict import predict as run_predict
        from transferkit.predict import predictions_text

        report = run_predict(settings, RichReporter())
        shown = settings.output_format(terminal=stdout.is_terminal)
        if shown is None:
            render_predictions(report, settings.top_k)
        elif writes_file:
            write_text(output, predictions_text(report, settings.top_k, shown))
        else:
            sys.stdout.write(predictions_text(report, settings.top_k, shown))
            sys.stdout.flush()
        render_prediction_summary(report)
        if report.predicted == 0:
            from transferkit.errors import DataError

            raise DataError(f"None of the {len(report.predictions)} file(s) given could be "
                            f"read as an image, so nothing was predicted.")


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
        settings = EvaluateConfig(run_dir=run, data_dir=data, output=output, top_k=top_k,
                                  batch_size=batch_size, gallery=gallery, overwrite=overwrite)
        from transferkit.data.folders import check_data_root
        from transferkit.files import check_new_output
        from transferkit.runs import read_record

        read_record(run)
        if data is not None:
            check_data_root(data)
        if output is not None:
            check_new_output(output, overwrite, what="evaluation folder")
        load_tensorflow()
        from transferkit.console import RichReporter, render_evaluation
        from transferkit.evaluate import evaluate as run_evaluate

        render_evaluation(run_evaluate(settings, RichReporter()))


@app.command("augment-preview")
@with_options(AugmentConfig, "augmentation", AUG_PANEL)
def augment_preview(
    data: DataArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="PNG file to write.", rich_help_panel=OUT_PANEL,
        dir_okay=False, show_default=False)],
    config: ConfigOpt = None,
    images: Annotated[int, typer.Option(
        "--images", help="How many training images (one per row, the classes in turn).",
        rich_help_panel=OUT_PANEL)] = default(PreviewConfig, "images"),
    variants: Annotated[int, typer.Option(
        "--variants", help="Augmented draws per image, after the original.",
        rich_help_panel=OUT_PANEL)] = default(PreviewConfig, "variants"),
    base: BaseOpt = FINETUNE_BASE,
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    overwrite: OverwriteOpt = False,
    augmentation: AugmentConfig = AUGMENT_DEFAULTS,  # from with_options
) -> None:
    """Save a grid of augmented versions of a few training images, to judge the augmentation."""
    with _user_errors():
        settings = PreviewConfig(
            data=DataConfig(data_dir=data, image_size=image_size, seed=seed), output=output,
            base=base.value, images=images, variants=variants, overwrite=overwrite,
            augment=augmentation)
        from transferkit.files import check_new_output

        _check_data(settings.data, settings.base)
        check_new_output(output, overwrite)
        load_tensorflow()
        from transferkit.console import RichReporter, stderr
        from transferkit.training.checks import preview_augmentation

        rows = preview_augmentation(settings, RichReporter())
        stderr.print(f"Wrote {rows} image(s), each as the original and {variants} augmented "
                     f"draws, to '{output}'.")


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
        from transferkit.console import RichReporter, render_doctor, render_quarantine
        from transferkit.doctor import check_quarantine, diagnose
        from transferkit.doctor import quarantine as move_unusable
        from transferkit.files import check_new_output, write_json

        if output is not None:
            check_new_output(output, overwrite)
        if quarantine is not None:  # refused before anything is inspected or written
            check_quarantine(data, quarantine)
        report = diagnose(data, get_base(base.value).min_size, RichReporter(), cache)
        render_doctor(report)
        if output is not None:
            write_json(output, report.to_dict())
        if quarantine is not None:
            render_quarantine(move_unusable(report, quarantine, RichReporter()), quarantine)
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
        "--format", help="; ".join(
            f"{f.name} ({f.help}{f'; needs transferkit[{f.extra}]' if f.extra else ''})"
            for f in FORMATS.values()) + ".",
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
        settings = ExportConfig(run_dir=run, output=output, format=export_format.value,
                                quantize=quantize.value, check_images=check_images,
                                overwrite=overwrite)
        from transferkit.export import get_format
        from transferkit.files import check_new_output
        from transferkit.runs import read_record

        fmt = get_format(settings.format, output)
        check_new_output(output, overwrite,
                         what="export folder" if fmt.is_folder else "export file")
        read_record(run)
        load_tensorflow()
        from transferkit.console import RichReporter, render_export
        from transferkit.export import export as run_export

        render_export(run_export(settings, RichReporter()))


@app.command()
def upgrade(
    run: Annotated[Path, typer.Argument(
        help="Run directory written by transferkit 0.1.", exists=False, file_okay=False,
        show_default=False)],
) -> None:
    """Re-save a run written by transferkit 0.1 as plain Keras (run format 2), in place."""
    with _user_errors():
        from transferkit.runs import RECORD_FILE

        if not (run / RECORD_FILE).is_file():
            from transferkit.runs import read_record

            read_record(run)  # says what is wrong with the folder
        load_tensorflow()
        from transferkit.console import stdout
        from transferkit.legacy import upgrade_run

        upgrade_run(run)
        stdout.print(f"Re-saved '{run}' as run format 2: its model.keras now loads in plain "
                     f"Keras, and every command reads it.")


@app.command("bases")
def bases_command(
    name: Annotated[Base | None, typer.Argument(
        help="Show this base's blocks.", show_default=False)] = None,
    rank: Annotated[Path | None, typer.Option(
        "--rank", help="Rank the bases whose ImageNet weights are on this machine by the "
                       "cross-validated accuracy of a linear probe on DATA.", metavar="DATA",
        file_okay=False, show_default=False)] = None,
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
) -> None:
    """List the pretrained bases: size, blocks, input scaling, offline ImageNet weights."""
    from transferkit.console import render_base, render_bases

    if rank is not None:
        with _user_errors():
            data = DataConfig(data_dir=rank, image_size=image_size, seed=seed)
            from transferkit.data.folders import check_data_folder

            check_data_folder(data.data_dir)
            load_tensorflow()
            from transferkit.console import RichReporter, render_ranks
            from transferkit.ranking import rank_bases

            render_ranks(rank_bases(data, RichReporter()))
    elif name is None:
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
        from transferkit.cache import cache_dir, cache_usage, clear_cache
        from transferkit.console import render_cache

        if clear:
            clear_cache(weights=weights)
        render_cache(cache_dir(), cache_usage())


def main() -> None:
    """Console-script entry point."""
    app()

