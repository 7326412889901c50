"""The only module that imports rich: consoles, progress bars, tables, the Reporter for the CLI.

Results go to stdout; progress and diagnostics to stderr, so redirected output stays clean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from transferkit.reporting import StageInfo

if TYPE_CHECKING:
    from pathlib import Path

    from transferkit.bases import BaseSpec
    from transferkit.commands.audit import AuditResult
    from transferkit.commands.bases import Ranking
    from transferkit.commands.cv import CVResult
    from transferkit.commands.doctor import DoctorReport
    from transferkit.commands.evaluate import EvaluationResult
    from transferkit.commands.export import ExportResult
    from transferkit.commands.extract import ExtractResult
    from transferkit.commands.finetune import FinetuneResult
    from transferkit.commands.predict import PredictionReport
    from transferkit.commands.select import Selection
    from transferkit.runs.records import Choice, Score, StageResult
    from transferkit.training.checks import OverfitResult

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)  # a path in a message never breaks


class Table(RichTable):
    """Every table here: no number or name is ever cut short. Headers and text wrap at
    spaces, and what still cannot fit folds onto the next line instead of ending in '…';
    the tables are laid out to fit 80 columns whole (no padding at their edges)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("pad_edge", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def add_column(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)  # type: ignore[arg-type]

# Keras metric name -> short label for terminal lines and tables.
_METRICS = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc"}


def print_error(message: str) -> None:
    stderr.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)


def format_metrics(metrics: Mapping[str, float]) -> str:
    parts = [f"{short} {metrics[k]:.3f}" for k, short in _METRICS.items() if k in metrics]
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.2g}")
    if "seconds" in metrics:
        parts.append(f"{metrics['seconds']:.1f}s")
    return "  ".join(parts)


class RichReporter:
    """Reporter for the terminal: a stage header, a line per epoch, transient progress bars."""

    def __init__(self, console: Console = stderr) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: int | None = None

    def info(self, message: str) -> None:
        self.console.print(escape(message))

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)

    def stage_started(self, stage: StageInfo) -> None:
        self.console.rule(f"[bold]Stage '{stage.name}'[/]: {escape(stage.description)}")
        self.console.print(
            f"{stage.trainable_params:,} trainable parameters ({stage.non_trainable_params:,} "
            f"frozen); {stage.epochs} epoch{'s' if stage.epochs != 1 else ''}, lr "
            f"{stage.learning_rate:.2g}"
            + (f", label smoothing {stage.label_smoothing:g}" if stage.label_smoothing else ""))

    def epoch_ended(self, stage: str, epoch: int, epochs: int,
                    metrics: Mapping[str, float]) -> None:
        self.console.print(f"{stage} {epoch}/{epochs}  {format_metrics(metrics)}")

    def start_progress(self, description: str, total: int | None) -> None:
        self.stop_progress()
        if not self.console.is_terminal:  # a bar in a log file is only noise
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None


def render_stages(stages: Sequence[StageResult], kept: str | None = None) -> None:
    """The stages side by side: what trained, and the epoch each kept."""
    table = Table(title="Training summary", box=box.SIMPLE_HEAD, collapse_padding=True,
                  caption="epochs: run; best: the epoch kept, counted across stages as in the "
                          "epoch lines; metrics of that epoch; params: trainable")
    for name in ("stage", "epochs", "best", "lr", "params", *_METRICS.values()):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for s in stages:
        name = f"{s.name} *" if s.name == kept else s.name
        table.add_row(name, str(s.epochs), str(s.best_epoch or "-"), f"{s.learning_rate:.2g}",
                      f"{s.trainable_params:,}",
                      *(f"{s.metrics[k]:.3f}" if k in s.metrics else "-" for k in _METRICS))
    stdout.print(table)


def render_epochs(history: Sequence[Mapping[str, object]]) -> None:
    """Every epoch of every stage in one table."""
    table = Table(title="Epochs", box=box.SIMPLE_HEAD, collapse_padding=True)
    for name in ("stage", "epoch", *_METRICS.values(), "lr", "seconds"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for row in history:
        table.add_row(str(row["stage"]), str(row["epoch"]),
                      *(f"{row[k]:.3f}" if k in row else "-" for k in _METRICS),
                      f"{row.get('learning_rate', float('nan')):.2g}",
                      f"{row['seconds']:.1f}" if "seconds" in row else "-")
    stdout.print(table)


def render_finetune(result: FinetuneResult | None) -> None:
    if result is None:  # a worker that is not the chief: its lines said what it did
        return
    if result.history:
        render_epochs(result.history)
        render_stages(result.stages, result.kept_stage)
    render_choice(result.choice, result.dropped, {s.name for s in result.stages})
    render_scores(result.scores)
    if not result.calibration.skipped:
        stdout.print(f"Probabilities calibrated: {result.calibration.describe()}")
    from transferkit.training.choice import why_kept

    refit = "" if result.refit is None else \
        f", then fitted again on train + val ({result.refit.images} images)"
    stdout.print(f"Saved model: '{result.kept_stage}' ({why_kept(result.kept_stage)}){refit}, "
                 f"in {escape(str(result.run_dir))}")


def render_choice(choice: Choice, dropped: Mapping[str, int] | None = None,
                  stages: set[str] | frozenset[str] = frozenset()) -> None:
    """Every candidate model tried, on val, simplest first, and why the kept one was kept;
    `dropped`: those fitted before the stages (named in `stages`) that did not beat the probe
    by more than noise (left out of the choice), listed before the stages."""
    table = Table(title="Candidates on val (simplest first)", box=box.SIMPLE_HEAD,
                  collapse_padding=True,
                  caption="a candidate replaces the one before only by more right answers "
                          "than noise: sqrt(images on which they disagree)")
    for name in ("model", "right", "accuracy", "vs kept so far", "noise", ""):
        table.add_column(name, justify="left" if name in ("model", "") else "right")
    from transferkit.training.choice import tried

    dropped = dropped or {}
    for name, correct, step in tried(choice, dropped, stages):
        table.add_row(name, f"{correct}/{choice.n}", f"{correct / choice.n:.3f}",
                      "-" if step is None else f"{step.margin:+d} vs {step.simpler}",
                      "-" if step is None else f"{step.noise:.1f}",
                      "kept" if name == choice.kept else "not beyond the probe"
                      if name in dropped else "")
    stdout.print(table)


def render_audit(result: AuditResult) -> None:
    """The counts, then the first few of each finding; the report has them all."""
    leaks = sum(p.cross_split for p in result.near_duplicates)
    stdout.print(f"Audited {result.images} images in {result.seconds:.1f} s (out-of-fold "
                 f"accuracy of a linear probe {result.oof_accuracy:.3f}):")
    stdout.print(f"  {len(result.label_issues)} likely label error(s), "
                 f"{len(result.near_duplicates)} near-duplicate pair(s) ({leaks} across "
                 f"splits), {len(result.outliers)} outlier(s)")
    if result.label_issues:
        table = Table(title="Most likely label errors", box=box.SIMPLE_HEAD,
                      collapse_padding=True)
        for name in ("path", "given", "suggested", "quality"):
            table.add_column(name, justify="right" if name == "quality" else "left",
                             overflow="fold")
        for issue in result.label_issues[:10]:
            table.add_row(escape(issue.path), escape(issue.given), escape(issue.suggested),
                          f"{issue.score:.3f}")
        stdout.print(table)
    for pair in [p for p in result.near_duplicates if p.cross_split][:10]:
        stdout.print(escape(f"  leak: {pair.paths[0]} ({pair.splits[0]}) ~ {pair.paths[1]} "
                            f"({pair.splits[1]}), similarity {pair.similarity:.3f}"))
    stdout.print(f"Wrote audit.json and report.html to {escape(str(result.output))}")


def render_selection(result: Selection) -> None:
    """The picks, best first, and what was left out of the pool and why."""
    table = Table(title=f"Label these {len(result.picks)} next (best first)",
                  box=box.SIMPLE_HEAD, collapse_padding=True)
    for name in ("path", "uncertainty", "why"):
        table.add_column(name, justify="right" if name == "uncertainty" else "left",
                         overflow="fold")
    for pick in result.picks[:20]:
        table.add_row(escape(str(pick.path)), f"{pick.score:.3f}", escape(pick.reason))
    stdout.print(table)
    stdout.print(f"From {result.pool} pool images in {result.seconds:.1f} s; left out "
                 f"{result.labelled_copies} already labelled (same content or near-copies) "
                 f"and {result.outliers} far from every class (likely junk).")
    if result.unknown:
        stdout.print(f"{result.unknown} of the picks look unlike every labelled class (the "
                     f"novelty score), listed last: check that they belong to the task.")
    written = str(result.output) + (f" and {result.html}" if result.html else "")
    stdout.print(f"Wrote {escape(written)}")


def render_cv(result: CVResult) -> None:
    """Each fold's held-out accuracy, their mean, and the pooled out-of-fold score."""
    cv = result.record.cross_validation
    assert cv is not None
    table = Table(title=f"{cv.folds}-fold cross-validation", box=box.SIMPLE_HEAD,
                  collapse_padding=True,
                  caption="each fold chose its epochs and model on an inner val split; "
                          "its score is on the fold it never saw")
    for name in ("fold", "right", "accuracy", "95 % CI"):
        table.add_column(name, justify="left" if name == "fold" else "right")
    for s in cv.fold_scores:
        table.add_row(s.split, f"{s.correct}/{s.n}", f"{s.accuracy:.3f}",
                      f"{s.low:.3f}-{s.high:.3f}")
    stdout.print(table)
    stdout.print(f"mean fold accuracy {cv.mean:.3f} (sd {cv.sd:.3f} across folds)")
    render_scores(result.record.scores)
    stdout.print(f"Saved the ensemble of {cv.folds} fold models, oof.csv and the fold runs in "
                 f"{escape(str(result.run_dir))}")


def render_scores(scores: Sequence[Score]) -> None:
    """Each accuracy with its split, n and 95 % interval, and whether the split chose."""
    for score in scores:
        note = (f" ({score.seen} of its images trained the run or chose its model: not held "
                f"out, it flatters the model)" if score.seen else
                " (this split chose the epochs and stages, so it flatters the model)"
                if score.chose else " (held out: nothing was chosen on it)")
        stdout.print(escape(score.describe() + note))


def render_overfit(result: OverfitResult) -> None:
    verdict = "[green]passed[/]" if result.passed else "[red]FAILED[/]"
    stdout.print(
        f"Overfit check {verdict}: training accuracy {result.train_accuracy:.3f} on "
        f"{result.images} images after {result.epochs} epochs (loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}), with no augmentation, dropout or L2.")
    if not result.passed:
        stdout.print("A working pipeline memorises a handful of images. Check that the labels "
                     "match the images, that the images decode (transferkit doctor), and try a "
                     "lower --learning-rate.")


def render_evaluation(result: EvaluationResult) -> None:
    e = result.evaluation
    stdout.print(f"Evaluated {e.images} images from {escape(result.source)}")
    tops = "  ".join(f"top-{k} {v:.4f}" for k, v in e.top_k_accuracy.items() if k > 1)
    render_scores([e.score])
    stdout.print(f"{tops}  macro F1 {e.macro_f1:.4f}  expected calibration error "
                 f"{e.calibration_error:.3f}".strip())
    per_class = Table(title="Per class", box=box.SIMPLE_HEAD, collapse_padding=True,
                      caption="recall 95 % CI: Wilson interval of the class's accuracy")
    for name in ("class", "precision", "recall", "recall 95 % CI", "F1", "support"):
        per_class.add_column(name, justify="left" if name == "class" else "right")
    for c in e.per_class:
        per_class.add_row(escape(c.name), f"{c.precision:.3f}", f"{c.recall:.3f}",
                          f"{c.recall_low:.2f}-{c.recall_high:.2f}", f"{c.f1:.3f}",
                          str(c.support))
    stdout.print(per_class)
    # columns headed by the class's number, rows by number and name: a matrix of many
    # classes fits a terminal without cutting a name
    confusion = Table(title="Confusion matrix (rows: true, columns: predicted, by number)",
                      box=box.SIMPLE_HEAD, collapse_padding=True)
    confusion.add_column("")
    for k in range(1, len(e.class_names) + 1):
        confusion.add_column(str(k), justify="right")
    for i, (name, row) in enumerate(zip(e.class_names, e.confusion, strict=True)):
        confusion.add_row(f"{i + 1} {escape(name)}", *(f"[bold]{n}[/]" if i == j else str(n)
                                                        for j, n in enumerate(row)))
    stdout.print(confusion)
    stderr.print(f"Wrote metrics.json, confusion.png"
                 f"{' and mistakes.png' if result.mistakes else ''} to '{result.output}'.")


def render_extract(result: ExtractResult) -> None:
    shards = f" ({result.shards} shards)" if result.shards > 1 else ""
    table = Table(title=f"Features: {escape(str(result.features_path))}{shards}")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("feature width", justify="right")
    for name, n in result.counts.items():
        if n:
            table.add_row(name, str(n), str(result.width))
    stdout.print(table)
    if result.record is not None:
        render_stages(result.record.stages)
        render_scores(result.record.scores)


def render_predictions(report: PredictionReport, top_k: int) -> None:
    table = Table(title="Predictions")
    table.add_column("path", overflow="fold")
    table.add_column("label")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column("alternatives")
    if report.labelled:
        table.add_column("true label")
    for p in report.predictions:
        if p.error is not None:
            row = [escape(str(p.path)), "[red]error[/]", "-"]
            if top_k > 1:
                row.append(escape(p.error))
        else:
            label = (f"[dim]unknown[/] (best guess {escape(p.top_k[0][0])})" if p.unknown
                     else escape(p.label or ""))
            row = [escape(str(p.path)), label, f"{p.probability:.3f}"]
            if top_k > 1:
                row.append(", ".join(f"{escape(n)} {v:.3f}" for n, v in p.top_k[1:]))
        if report.labelled:
            row.append(escape(p.true_label or ""))
        table.add_row(*row)
    stdout.print(table)


def render_prediction_summary(report: PredictionReport) -> None:
    errors = [p for p in report.predictions if p.error is not None]
    if errors:
        stderr.print(f"[yellow]Warning:[/] {len(errors)} file(s) could not be read:")
        for p in errors:
            stderr.print(f"  {escape(str(p.path))}: {escape(p.error or '')}")
    if report.ignored:
        stderr.print(f"Ignored {report.ignored} non-image file(s) in the folders given.")
    if report.tta is not None:
        read = len(report.predictions) - len(errors)
        stderr.print(f"Test-time augmentation ({report.tta.views} views per image) changed "
                     f"the top label of {report.tta.changed} of {read} image(s); "
                     f"probabilities moved by {report.tta.mean_shift:.3f} on average.")
    if report.threshold is not None or report.novelty_threshold is not None:
        why = " or ".join(
            ([f"scored below --threshold {report.threshold:g}"] if report.threshold else [])
            + ([f"had a novelty score above the run's threshold "
                f"{report.novelty_threshold:.2f}"] if report.novelty_threshold is not None
               else []))
        stderr.print(f"{report.unknown} image(s) {why} and are labelled unknown.")
    if report.accuracy is not None:
        right = round(report.accuracy * report.labelled)
        stderr.print(f"{right} of {report.labelled} right"
                     + (f" (accuracy {report.accuracy:.3f})" if report.labelled >= 10 else "")
                     + f" among the image{'s' if report.labelled > 1 else ''} whose folder "
                     f"names a class" + (" (unknown counts as wrong)." if report.unknown else ".")
                     + (f" {report.seen} of them trained the run or chose its model: not held "
                        f"out, it flatters the model." if report.seen else ""))


def render_doctor(report: DoctorReport) -> None:
    """Per-class counts and colour modes, then every finding; a verdict on stderr."""
    from transferkit.commands.doctor import KINDS

    imbalance = report.imbalance()
    table = Table(title=f"Data: {escape(str(report.root))}", box=box.SIMPLE_HEAD,
                  collapse_padding=True)
    for name in ("split", "class", "images", "unusable", "colour modes"):
        table.add_column(name, justify="right" if name in ("images", "unusable") else "left")
    for c in report.classes:
        modes = ", ".join(f"{m} {n}" for m, n in c.modes.items())
        table.add_row(c.split, escape(c.name), str(c.images),
                      f"[red]{c.unusable}[/]" if c.unusable else "0", modes)
    stdout.print(table)
    for split, ratio in imbalance.items():
        stdout.print(f"Class imbalance ({split}): "
                     + ("n/a (an empty class)" if ratio is None else f"{ratio:.1f}:1"))
    if report.findings:
        found = Table(title="Findings", box=box.SIMPLE_HEAD, collapse_padding=True)
        found.add_column("finding")
        found.add_column("file(s)", overflow="fold")
        found.add_column("detail", overflow="fold")
        for f in report.findings:
            found.add_row(KINDS[f.kind], escape("\n".join(p.as_posix() for p in f.paths)),
                          escape(f.detail))
        stdout.print(found)
        stderr.print(f"[yellow]{len(report.findings)} problem(s)[/] in {report.files} files.")
    else:
        stderr.print(f"[green]No problems found[/] in {report.files} files.")
    stderr.print("doctor checks files and finds exact copies. For likely wrong labels, "
                 "resized or re-encoded copies across splits, and outliers, run: "
                 "transferkit audit DATA -o AUDIT (writes AUDIT/report.html).")


def render_quarantine(moved: Sequence[tuple[Path, Path]], destination: Path) -> None:
    """The summary after the moves (each was reported as it happened)."""
    if not moved:
        stderr.print("Nothing to quarantine: no unusable files.")
        return
    stderr.print(f"Moved {len(moved)} unusable file(s) into '{escape(str(destination))}'.")


def render_export(result: ExportResult) -> None:
    on = "its own images" if result.real_images else "random images (the run's data is gone)"
    stderr.print(f"Checked on {result.checked} of {on}: largest probability difference "
                 f"{result.max_difference:.2g} (tolerance {result.tolerance:g}), top-1 "
                 f"agreement {result.top1_agreement:.0%}.")
    stdout.print(f"Exported '{escape(str(result.path))}' ({result.size_bytes / 1e6:.1f} MB); "
                 f"class names in '{escape(str(result.labels_path))}'.")


def render_bases(specs: Sequence[BaseSpec]) -> None:
    table = Table(title="Convolutional bases", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
    for name in ("base", "params", "size", "min", "blocks", "features", "input", "ImageNet"):
        table.add_column(name, justify="left" if name in ("base", "input") else "right",
                         no_wrap=name != "input")
    for spec in specs:
        table.add_row(spec.name, f"{spec.params / 1e6:.1f}M", str(spec.default_size),
                      str(spec.min_size), str(len(spec.blocks)), str(spec.feature_dim),
                      spec.preprocessing.describe(),
                      "offline" if spec.imagenet.available() else "[dim]download[/dim]")
    stdout.print(table)
    stderr.print("size: default image size in pixels; min: the smallest it takes. ImageNet "
                 "weights marked 'download' are fetched by Keras on first use and cached in "
                 "~/.keras/models. `transferkit bases NAME` lists a base's blocks.")


def render_ranks(ranking: Ranking) -> None:
    table = Table(title="Bases ranked on this data", box=box.SIMPLE_HEAD, collapse_padding=True,
                  caption="a linear probe on each base's frozen features, cross-validated over "
                          "train and val (test is never used); from the cheapest up, a costlier "
                          "base is chosen only when it wins by more than noise")
    for name in ("rank", "base", "accuracy", "95 % CI", "n", "compute", "s", ""):
        table.add_column(name, justify="left" if name in ("base", "") else "right",
                         no_wrap=bool(name))  # base names differ only at their ends
    for i, r in enumerate(ranking.ranks, 1):
        table.add_row(str(i), r.base, f"{r.score.accuracy:.3f}",
                      f"{r.score.low:.3f}-{r.score.high:.3f}", str(r.score.n), f"{r.cost:g}x",
                      f"{r.seconds:.1f}", "chosen" if r.base == ranking.best else "")
    stdout.print(table)
    stderr.print("Only bases whose ImageNet weights are on this machine are ranked; the others "
                 "are downloaded by Keras on first use (`transferkit bases` marks them).")


def render_base(spec: BaseSpec) -> None:
    weights = "available offline" if spec.imagenet.available() else "downloaded on first use"
    stdout.print(f"[bold]{spec.name}[/bold]: {spec.params:,} parameters, default "
                 f"{spec.default_size} px (min {spec.min_size}), {spec.feature_dim} features, "
                 f"input {spec.preprocessing.describe()}, ImageNet weights {weights}.")
    stdout.print(f"{len(spec.blocks)} blocks, bottom to top (--unfreeze-blocks N tunes the "
                 f"last N; extract --blocks N keeps the first N):")
    for i, block in enumerate(spec.blocks, 1):
        stdout.print(f"  {i:2d}  {block}")


def render_cache(folder: Path, usage: Mapping[str, tuple[int, int]]) -> None:
    table = Table(title=f"Cache: {escape(str(folder))}", box=box.SIMPLE_HEAD,
                  collapse_padding=True)
    for name in ("part", "files", "MB"):
        table.add_column(name, justify="left" if name == "part" else "right")
    for part, (files, size) in usage.items():
        table.add_row(part, str(files), f"{size / 1e6:.1f}")
    stdout.print(table)


def render_upgrade(run: Path, was: int) -> None:
    from transferkit.runs.records import RUN_FORMAT_VERSION

    stdout.print(f"Brought '{run}' from run format {was} to {RUN_FORMAT_VERSION}, in place"
                 + (": its model.keras now loads in plain Keras" if was == 1 else "")
                 + ". Every command reads it now.")
