"""The command line: options -> config -> cheap checks -> load TensorFlow -> one core call ->
render. Options are generated from the config fields (options.py); TensorFlow and the core
load inside commands only, so `transferkit --help` and usage errors answer at once.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Annotated

import typer

from transferkit import __version__
from transferkit.cli.options import GIVEN, Group, Settings, configured, polish_help
from transferkit.cli.prechecks import check_data, check_recipe, check_resume, with_stdin
from transferkit.cli.running import load, user_errors
from transferkit.config import (
    SAVEDMODEL_FILES,
    STDOUT,
    AuditConfig,
    BasesConfig,
    CVConfig,
    DataConfig,
    DoctorConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    PreviewConfig,
    SelectConfig,
    ServeConfig,
)
from transferkit.errors import ConfigError
from transferkit.quiet import set_verbose

app = typer.Typer(
    name="transferkit",
    help="Transfer learning on image folders: the Keras recipe, done right, in three commands.",
    no_args_is_help=True,
    add_completion=False,
    cls=Group,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version,
        is_eager=True, metavar="")] = False,
          verbose: Annotated[bool, typer.Option(
        "--verbose", help="Also show TensorFlow's own log lines (also: TRANSFERKIT_VERBOSE=1).",
        metavar="")] = False) -> None:
    """Transfer learning on image folders: doctor, finetune, extract, predict, evaluate."""
    set_verbose(verbose)
    # A file name that is not valid UTF-8 is printed as its own bytes, as `ls` does, instead
    # of failing the command (stderr already escapes them).
    with contextlib.suppress(AttributeError, io.UnsupportedOperation):
        sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]


@app.command()
@configured(FinetuneConfig, optional=("data_dir", "output"))
def finetune(
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue an interrupted run directory where it stopped, with its "
                         "saved settings.", rich_help_panel="Output", file_okay=False,
        show_default=False)] = None,
    overfit_check: Annotated[bool, typer.Option(
        "--overfit-check", help="Only check that the head can memorise two batches (~100 % "
                                "training accuracy), then exit 0 (passed) or 1.",
        rich_help_panel="Sanity checks", hidden=True, metavar="")] = False,
    settings: Settings = GIVEN,
) -> None:
    """Fit a linear probe on a frozen pretrained base, then fine-tune its top blocks, and keep
    the simplest model that is not beaten by more than noise.

    With --no-augment, the head stage trains on frozen-base features computed once (and
    cached), which is many times faster than pushing every image through the base each epoch.
    """
    with user_errors():
        if resume is not None:
            return _resume(resume, settings)
        config = settings.build()
        if config.output is None and not overfit_check:
            raise ConfigError("Pass the DATA folder and -o RUN (or --resume RUN).")
        check_recipe(config)
        load(config.runtime)
        from transferkit.cli.console import RichReporter, render_finetune, render_overfit

        if not overfit_check:
            from transferkit.commands.finetune import finetune as run_finetune

            return render_finetune(run_finetune(config, RichReporter()))
        from transferkit.training.checks import overfit_check as run_overfit_check

        result = run_overfit_check(config, RichReporter())
        render_overfit(result)
    if not result.passed:
        raise typer.Exit(1)


def _resume(run_dir: Path, settings: Settings) -> None:
    """finetune --resume RUN."""
    check_resume(run_dir, settings, "finetune")
    load()
    from transferkit.cli.console import RichReporter, render_finetune
    from transferkit.commands.finetune import resume_finetune

    render_finetune(resume_finetune(run_dir, RichReporter()))


@app.command()
@configured(CVConfig, optional=("data_dir", "output"))
def cv(
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue an interrupted cv run directory: finished folds are kept, "
                         "an interrupted one continues from its checkpoint.",
        rich_help_panel="Output", file_okay=False, show_default=False)] = None,
    settings: Settings = GIVEN,
) -> None:
    """Cross-validate the finetune recipe: K stratified folds, an out-of-fold prediction for
    every image (oof.csv), each fold's held-out accuracy with its interval, and the K fold
    models saved as one averaged model that predict, evaluate and export take.

    train/ and val/ are pooled; test/ stays out, and the ensemble is scored on it. Every
    finetune setting applies to each fold's run.
    """
    with user_errors():
        from transferkit.cli.console import RichReporter, render_cv

        if resume is not None:
            check_resume(resume, settings, "cv")
            load()
            from transferkit.commands.cv import resume_cv

            return render_cv(resume_cv(resume, RichReporter()))
        config = settings.build()
        if config.recipe.output is None:
            raise ConfigError("Pass the DATA folder and -o RUN (or --resume RUN).")
        check_recipe(config.recipe, "cv")
        load(config.recipe.runtime)
        from transferkit.commands.cv import cross_validate

        render_cv(cross_validate(config, RichReporter()))


@app.command()
@configured(AuditConfig)
def audit(settings: Settings = GIVEN) -> None:
    """Find likely label errors, near-duplicates (and leaks between splits) and outliers,
    from frozen-base features; write audit.json and a self-contained report.html. Never moves
    or edits the data."""
    with user_errors():
        config = settings.build()
        from transferkit.runs.directory import AUDIT_FILES, check_output

        check_data(config.data, config.base)
        check_output(config.output, config.overwrite, "audit folder",
                     data=config.data.data_dir, writes=AUDIT_FILES)
        load(config.runtime)
        from transferkit.cli.console import RichReporter, render_audit
        from transferkit.commands.audit import audit as run_audit

        render_audit(run_audit(config, RichReporter()))


@app.command()
@configured(SelectConfig)
def select(settings: Settings = GIVEN) -> None:
    """Pick which images of an unlabelled --pool folder to label next, into picks.csv."""
    with user_errors():
        config = settings.build()
        check_data(config.data, config.base)
        load(config.runtime)
        from transferkit.cli.console import RichReporter, render_selection
        from transferkit.commands.select import select as run_select

        render_selection(run_select(config, RichReporter()))


@app.command()
@configured(ServeConfig)
def serve(settings: Settings = GIVEN) -> None:
    """Answer predictions over HTTP: POST /predict with images; GET /health, /ready, /metadata.
    Needs the serve extra (the error says how to install it)."""
    with user_errors():
        config = settings.build()
        load(config.runtime)
        from transferkit.cli.console import RichReporter
        from transferkit.commands.serve import serve as run_serve

        run_serve(config, RichReporter())


@app.command()
@configured(ExtractConfig)
def extract(settings: Settings = GIVEN) -> None:
    """Run the frozen base over every image and save the features (and train a classifier).

    Features are cached by base, weights, size, cut point and each file's content: a re-run
    computes only new or edited images.
    """
    with user_errors():
        config = settings.build()
        from transferkit.runs.directory import check_output, check_run_output

        check_data(config.data, config.base, config.blocks, "--blocks")
        check_output(config.output, config.overwrite, config.output_kind,
                     data=config.data.data_dir)
        if config.head is not None:
            check_run_output(config.head.output, config.overwrite, config.data.data_dir,
                             "extract")
        load(config.runtime)
        from transferkit.cli.console import RichReporter, render_extract
        from transferkit.commands.extract import extract as run_extract

        render_extract(run_extract(config, RichReporter()))


@app.command()
@configured(PredictConfig)
def predict(settings: Settings = GIVEN) -> None:
    """Predict labels for image files and folders."""
    with user_errors():
        config = settings.build(**with_stdin(settings.values["paths"]))
        from transferkit.runs.directory import check_output, read_record

        read_record(config.run_dir)
        if config.output not in (None, STDOUT):
            check_output(config.output, config.overwrite)
        load(config.runtime)
        from transferkit.cli.console import (
            RichReporter,
            render_prediction_summary,
            render_predictions,
            stdout,
        )
        from transferkit.commands.predict import predict as run_predict
        from transferkit.commands.predict import write_predictions

        report = run_predict(config, RichReporter())
        shown = config.output_format(terminal=stdout.is_terminal)
        if shown is None:
            render_predictions(report, config.top_k)
        else:
            write_predictions(config, report, shown)
        render_prediction_summary(report)
        if report.predicted == 0:
            from transferkit.errors import DataError

            raise DataError(f"None of the {len(report.predictions)} file(s) given could be "
                            f"read as an image, so nothing was predicted.")


@app.command()
@configured(EvaluateConfig)
def evaluate(settings: Settings = GIVEN) -> None:
    """Accuracy, top-k, per-class precision/recall/F1, confusion matrix, worst mistakes."""
    with user_errors():
        config = settings.build()
        from transferkit.data.folders import check_data_root
        from transferkit.runs.directory import EVALUATION_FILES, check_output, read_record

        read_record(config.run_dir)
        if config.data_dir is not None:
            check_data_root(config.data_dir)
        if config.output is not None:
            check_output(config.output, config.overwrite, "evaluation folder",
                         config.data_dir, writes=EVALUATION_FILES)
        load(config.runtime)
        from transferkit.cli.console import RichReporter, render_evaluation
        from transferkit.commands.evaluate import evaluate as run_evaluate

        render_evaluation(run_evaluate(config, RichReporter()))


@app.command("augment-preview")
@configured(PreviewConfig)
def augment_preview(settings: Settings = GIVEN) -> None:
    """Save a grid of augmented versions of a few training images, to judge the augmentation."""
    with user_errors():
        config = settings.build()
        from transferkit.runs.directory import check_output

        check_data(config.data, config.base)
        check_output(config.output, config.overwrite, data=config.data.data_dir)
        load()
        from transferkit.cli.console import RichReporter, stderr
        from transferkit.commands.augment_preview import preview_augmentation

        rows = preview_augmentation(config, RichReporter())
        stderr.print(f"Wrote {rows} image(s), each as the original and {config.variants} "
                     f"augmented draws, to '{config.output}'.")


@app.command()
@configured(DoctorConfig)
def doctor(settings: Settings = GIVEN) -> None:
    """Check a data folder: decode every file, find bad files and exact duplicates (audit finds
    likely wrong labels).

    Exits 0 when the folder is clean and 1 when problems were found.
    """
    with user_errors():
        config = settings.build()
        from transferkit.bases import get_base
        from transferkit.cli.console import RichReporter, render_doctor, render_quarantine
        from transferkit.commands.doctor import check_quarantine, diagnose, quarantine
        from transferkit.files import write_json
        from transferkit.runs.directory import check_output

        if config.output is not None:
            check_output(config.output, config.overwrite, data=config.data_dir)
        if config.quarantine is not None:  # refused before anything is inspected or written
            check_quarantine(config.data_dir, config.quarantine)
        report = diagnose(config.data_dir, get_base(config.base).min_size, RichReporter(),
                          config.cache)
        render_doctor(report)
        if config.output is not None:
            write_json(config.output, report.to_dict())
        if config.quarantine is not None:
            moved = quarantine(report, config.quarantine, RichReporter())
            render_quarantine(moved, config.quarantine)
    if not report.clean:
        raise typer.Exit(1)


@app.command()
@configured(ExportConfig)
def export(settings: Settings = GIVEN) -> None:
    """Export a run's model (preprocessing included) and check it against Keras."""
    with user_errors():
        config = settings.build()
        from transferkit.runs.directory import check_output, read_record

        check_output(config.output, config.overwrite, what=config.output_kind,
                     writes=SAVEDMODEL_FILES)
        read_record(config.run_dir)
        load()
        from transferkit.cli.console import RichReporter, render_export
        from transferkit.commands.export import export as run_export

        render_export(run_export(config, RichReporter()))


@app.command()
def upgrade(
    run: Annotated[Path, typer.Argument(
        help="Run directory written by an earlier transferkit.", exists=False, file_okay=False,
        show_default=False)],
) -> None:
    """Bring a run written by an earlier transferkit up to date, in place."""
    with user_errors():
        from transferkit.files import check_writable
        from transferkit.runs.directory import check_run_dir

        check_run_dir(run)
        check_writable(run, fix=f"upgrade rewrites the run in place: copy it to a folder you "
                                f"can write (cp -r {run} COPY) and upgrade the copy.")
        load()
        from transferkit.cli.console import render_upgrade
        from transferkit.commands.upgrade import upgrade_run

        render_upgrade(run, upgrade_run(run))


@app.command("bases")
@configured(BasesConfig)
def bases_command(settings: Settings = GIVEN) -> None:
    """List the pretrained bases: size, blocks, input scaling, offline ImageNet weights."""
    from transferkit.bases import BASES, get_base
    from transferkit.cli.console import render_base, render_bases

    with user_errors():
        config = settings.build()
        if config.rank is None:
            return render_base(get_base(config.name)) if config.name else render_bases(
                list(BASES.values()))
        data = DataConfig(data_dir=config.rank, image_size=config.image_size, seed=config.seed)
        from transferkit.data.folders import check_data_folder

        check_data_folder(data.data_dir)
        load(config.runtime)
        from transferkit.cli.console import RichReporter, render_ranks
        from transferkit.commands.bases import rank_bases

        render_ranks(rank_bases(data, RichReporter(), engine=config.engine))


@app.command("cache")
def cache_command(
    clear: Annotated[bool, typer.Option(
        "--clear", help="Delete cached features and converted images (rebuilt when needed).",
        rich_help_panel="Output", metavar="")] = False,
    weights: Annotated[bool, typer.Option(
        "--weights", help="With --clear, also delete the converted ImageNet weights.",
        rich_help_panel="Output", metavar="")] = False,
) -> None:
    """Show what transferkit caches (features, converted images, weights), or clear it."""
    with user_errors():
        from transferkit.cache import cache_dir, cache_usage, clear_cache
        from transferkit.cli.console import render_cache

        if weights and not clear:
            raise ConfigError("--weights says what --clear also deletes; pass both, or neither "
                              "to see what the cache holds.")
        if clear:
            clear_cache(weights=weights)
        render_cache(cache_dir(), cache_usage())


polish_help(app)


def main() -> None:
    """Console-script entry point."""
    app()
