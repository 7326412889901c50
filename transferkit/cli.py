"""The command line: options -> config -> one core call -> render.

TensorFlow and Keras load inside commands only, so `transferkit --help` answers at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from transferkit import __version__
from transferkit.bases import BASES
from transferkit.config import (
    AugmentConfig,
    DataConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
    PredictConfig,
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

Base = Enum("Base", {name: name for name in BASES}, type=str)  # type: ignore[misc]


class Pooling(str, Enum):
    avg = "avg"
    max = "max"


FINETUNE_BASE = Base(default(FinetuneConfig, "base"))
EXTRACT_BASE = Base(default(ExtractConfig, "base"))
EXTRACT_POOLING = Pooling(default(ExtractConfig, "pooling"))


DATA_PANEL, MODEL_PANEL, TRAIN_PANEL, AUG_PANEL, OUT_PANEL = (
    "Data", "Base model", "Training", "Augmentation (ImageDataGenerator units)", "Output")

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
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the split, shuffling, "
                                                     "augmentation and initial weights.",
                                      rich_help_panel=DATA_PANEL)]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output instead of refusing.",
    rich_help_panel=OUT_PANEL)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version,
        is_eager=True)] = False) -> None:
    """Transfer learning on image folders: finetune, extract, predict."""


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
    base: BaseOpt = FINETUNE_BASE,
    weights: WeightsOpt = default(FinetuneConfig, "weights"),
    image_size: ImageSizeOpt = default(DataConfig, "image_size"),
    val_split: ValSplitOpt = default(DataConfig, "val_split"),
    batch_size: BatchOpt = default(DataConfig, "batch_size"),
    seed: SeedOpt = default(DataConfig, "seed"),
    epochs: Annotated[int, typer.Option(
        "--epochs", help="Stage 1: epochs training the new head on the frozen base.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "epochs"),
    learning_rate: Annotated[float, typer.Option(
        "--learning-rate", help="Stage 1 learning rate (Adam).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "learning_rate"),
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", help="Stage 2: epochs with the top blocks unfrozen (0: skip).",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "finetune_epochs"),
    finetune_lr: Annotated[float, typer.Option(
        "--finetune-lr", help="Stage 2 learning rate: small, so pretrained features survive.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "finetune_lr"),
    unfreeze_blocks: Annotated[int, typer.Option(
        "--unfreeze-blocks", help="Stage 2: how many blocks to unfreeze, from the top.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "unfreeze_blocks"),
    dropout: Annotated[float, typer.Option(
        "--dropout", help="Dropout before the new softmax layer.",
        rich_help_panel=TRAIN_PANEL)] = default(FinetuneConfig, "dropout"),
    augment: Annotated[bool, typer.Option(
        "--augment/--no-augment", help="Augment training batches.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "enabled"),
    rotation_range: Annotated[float, typer.Option(
        "--rotation-range", help="Random rotation, degrees.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "rotation_range"),
    width_shift_range: Annotated[float, typer.Option(
        "--width-shift-range", help="Random horizontal shift, fraction of the width.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "width_shift_range"),
    height_shift_range: Annotated[float, typer.Option(
        "--height-shift-range", help="Random vertical shift, fraction of the height.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "height_shift_range"),
    shear_range: Annotated[float, typer.Option(
        "--shear-range", help="Random shear angle, degrees.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "shear_range"),
    zoom_range: Annotated[float, typer.Option(
        "--zoom-range", help="Random zoom between 1-Z and 1+Z.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "zoom_range"),
    horizontal_flip: Annotated[bool, typer.Option(
        "--horizontal-flip/--no-horizontal-flip", help="Random left-right flips.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "horizontal_flip"),
    vertical_flip: Annotated[bool, typer.Option(
        "--vertical-flip/--no-vertical-flip", help="Random up-down flips.",
        rich_help_panel=AUG_PANEL)] = default(AugmentConfig, "vertical_flip"),
    brightness_range: Annotated[tuple[float, float] | None, typer.Option(
        "--brightness-range", help="Random brightness factor between LOW and HIGH, e.g. 0.8 1.2.",
        rich_help_panel=AUG_PANEL, show_default=False)] = default(AugmentConfig,
                                                                  "brightness_range"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a new head on a frozen pretrained base, then fine-tune its top blocks."""
    from transferkit.console import RichReporter, render_stages

    if resume is not None:
        if data is not None or output is not None:
            raise typer.BadParameter("--resume takes the data folder and settings from the run "
                                     "directory; do not pass DATA or -o with it.")
        with _user_errors():
            from transferkit.training import resume_finetune

            render_stages(resume_finetune(resume, RichReporter()).stages)
        return
    if data is None or output is None:
        raise typer.BadParameter("Pass the DATA folder and -o RUN (or --resume RUN).")
    with _user_errors():
        config = FinetuneConfig(
            data=DataConfig(data, image_size, val_split, batch_size, seed),
            output=output, base=base.value, weights=weights, epochs=epochs,
            learning_rate=learning_rate, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
            unfreeze_blocks=unfreeze_blocks, dropout=dropout, overwrite=overwrite,
            augment=AugmentConfig(augment, rotation_range, width_shift_range, height_shift_range,
                                  shear_range, zoom_range, horizontal_flip, vertical_flip,
                                  brightness_range),
        )
        from transferkit.training import finetune as run_finetune

        result = run_finetune(config, RichReporter())
        render_stages(result.stages)


@app.command()
def extract(
    data: DataArg,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Feature file to write (.npz).", rich_help_panel=OUT_PANEL,
        dir_okay=False, show_default=False)],
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
    dropout: Annotated[float, typer.Option(
        "--dropout", help="Dropout before the classifier's softmax.",
        rich_help_panel=TRAIN_PANEL)] = default(HeadConfig, "dropout"),
    head_epochs: Annotated[int, typer.Option(
        "--head-epochs", help="Epochs of classifier training on the features.",
        rich_help_panel=TRAIN_PANEL)] = default(HeadConfig, "epochs"),
    learning_rate: Annotated[float, typer.Option(
        "--learning-rate", help="Classifier learning rate (Adam).",
        rich_help_panel=TRAIN_PANEL)] = default(HeadConfig, "learning_rate"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the frozen base over every image and save the features (and train a classifier)."""
    with _user_errors():
        head = None if train_head is None else HeadConfig(
            train_head, dense_units, dropout, head_epochs, learning_rate, overwrite)
        config = ExtractConfig(
            data=DataConfig(data, image_size, val_split, batch_size, seed), output=output,
            base=base.value, weights=weights, blocks=blocks, pooling=pooling.value,
            overwrite=overwrite, head=head)
        from transferkit.console import RichReporter, render_extract
        from transferkit.extract import extract as run_extract

        render_extract(run_extract(config, RichReporter()))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(
        help="Run directory written by finetune or extract --train-head.", exists=False,
        file_okay=False, show_default=False)],
    paths: Annotated[list[Path], typer.Argument(
        help="Image files and folders (searched recursively).", show_default=False)],
    top_k: Annotated[int, typer.Option(
        "--top-k", help="How many labels to list per image.",
        rich_help_panel=OUT_PANEL)] = default(PredictConfig, "top_k"),
    batch_size: BatchOpt = default(PredictConfig, "batch_size"),
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write predictions to a .csv or .json file instead of a table.",
        rich_help_panel=OUT_PANEL, dir_okay=False, show_default=False)] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Predict labels for image files and folders."""
    with _user_errors():
        config = PredictConfig(run, tuple(paths), top_k, batch_size, output, overwrite)
        from transferkit.artifacts import save_predictions
        from transferkit.console import (
            RichReporter,
            render_prediction_summary,
            render_predictions,
        )
        from transferkit.predict import predict as run_predict

        report = run_predict(config, RichReporter())
        if output is None:
            render_predictions(report, config.top_k)
        else:
            save_predictions(output, [p.to_dict() for p in report.predictions], config.top_k,
                             overwrite)
        render_prediction_summary(report)


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
        report = diagnose(data, get_base(base.value).min_size, RichReporter())
        render_doctor(report)
        if output is not None:
            save_report(output, report.to_dict(), overwrite)
        if quarantine is not None:
            render_quarantine(move_unusable(report, quarantine), quarantine)
    if not report.clean:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
