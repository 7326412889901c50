"""The typed run record (run.json) and the records inside it: plain, frozen dataclasses that
read and write themselves as JSON. Standard library only (and the config dataclasses), so
anything may import it; nothing here touches the disk.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.bases import Preprocessing
from transferkit.config import (
    AugmentConfig,
    ExtractConfig,
    FinetuneConfig,
    ScheduleConfig,
    from_dict,
    to_dict,
)
from transferkit.errors import ConfigError
from transferkit.reporting import fits_one_line
from transferkit.stats import wilson_interval

RUN_FORMAT = "transferkit-run"
# 3: the config as given, the image size and the Plan beside it; 4: the candidates fitted
# after the probe as one list (3's variant, combined and self_trained fields are read as it)
RUN_FORMAT_VERSION = 4
COMPLETE, RUNNING, INTERRUPTED, FAILED = "complete", "running", "interrupted", "failed"
STATUSES = (COMPLETE, RUNNING, INTERRUPTED, FAILED)
# command -> its config; a cv run records the recipe each of its folds ran
COMMANDS = {"finetune": FinetuneConfig, "extract": ExtractConfig, "cv": FinetuneConfig}


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """What one training stage did, and the epoch it kept (its best, restored at the end)."""

    name: str
    epochs: int  # run
    learning_rate: float
    trainable_params: int
    metrics: dict[str, float]  # of the kept epoch
    best_epoch: int | None
    best_val_accuracy: float | None
    stopped_early: bool = False


@dataclass(frozen=True, kw_only=True)
class Score:
    """An accuracy with its split, its n and its 95 % Wilson interval; `chose` says the split
    chose epochs or stages, and `seen` counts its images the run trained on or chose with:
    either makes the accuracy an optimistic estimate."""

    split: str
    n: int
    correct: int
    accuracy: float
    low: float
    high: float
    chose: bool
    seen: int = 0

    @classmethod
    def of(cls, split: str, correct: int, n: int, chose: bool, seen: int = 0) -> Score:
        low, high = wilson_interval(correct, n)
        return cls(split=split, n=n, correct=correct, accuracy=correct / n if n else 0.0,
                   low=low, high=high, chose=chose, seen=seen)

    def describe(self) -> str:
        """'val accuracy 0.895 (95 % CI 0.759-0.958, n=38)'."""
        return (f"{self.split} accuracy {self.accuracy:.3f} (95 % CI {self.low:.3f}-"
                f"{self.high:.3f}, n={self.n})")


@dataclass(frozen=True, kw_only=True)
class ProbeRecord:
    """The linear probe a finetune began with: its regularisation, how it was chosen, and
    when it was ready as a model (seconds after the run started)."""

    c: float
    folds: int  # of the cross-validation that chose c; 0: not cross-validated
    fit_seconds: float
    ready_after: float
    val_correct: int | None = None  # val images it got right: the bar the stages must clear


@dataclass(frozen=True, kw_only=True)
class Adaptation:
    """What finetune found about the data before its stages (training.adaptation): the
    out-of-fold accuracy on train of raw pixels, of the linear probe, and of raw pixels on
    the held-out images mirrored; and what it made of them."""

    folds: int
    images: int  # training images checked (a stratified sample of large sets)
    pixel_accuracy: float
    probe_accuracy: float
    mirrored_accuracy: float
    deep: bool  # the features fit the data badly: every block is fine-tuned
    mirror_changes_labels: bool  # left-right flips are left out of the augmentation
    seconds: float

    def describe(self) -> str:
        """Two lines for the console and the report: what was measured, what it decided."""
        how = f"{self.folds}-fold on {self.images} training images, {self.seconds:.1f} s"
        depth = ("the features remove less than half of the pixels' errors, so the data is "
                 "unlike the base's pretraining: fine-tuning goes deep" if self.deep else
                 "the features fit the data")
        mirror = ("left and right carry the label: no left-right flips"
                  if self.mirror_changes_labels else "mirroring keeps labels")
        return (f"Raw pixels {self.pixel_accuracy:.3f} vs the probe {self.probe_accuracy:.3f} "
                f"({how}): {depth}.\nMirrored images: raw pixels "
                f"{self.pixel_accuracy:.3f} -> {self.mirrored_accuracy:.3f}: {mirror}.")


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One step of choosing the kept model: `other` replaces `simpler` only when it gets
    more validation images right by more than the noise of that count."""

    simpler: str
    other: str
    margin: int  # images `other` gets right minus those `simpler` does, on the same images
    noise: float  # sqrt of the images on which they disagree (McNemar)
    won: bool


@dataclass(frozen=True, kw_only=True)
class Choice:
    """How the kept model was chosen among the candidates (simplest first)."""

    val_correct: dict[str, int]  # candidate -> validation images it gets right
    n: int
    comparisons: tuple[Comparison, ...]
    kept: str


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Temperature scaling fitted on val, with the expected calibration error (ECE) before
    and after, on val (which fitted it) and on test when there is one."""

    temperature: float
    val_ece_before: float
    val_ece_after: float
    test_ece_before: float | None = None
    test_ece_after: float | None = None
    skipped: str = ""  # why val could not set a temperature; the probabilities stay as given

    def describe(self) -> str:
        """One line for the console and the report."""
        on_test = ("" if self.test_ece_after is None else
                   f", on test {self.test_ece_before:.3f} -> {self.test_ece_after:.3f}")
        if self.skipped:
            on_test = "" if self.test_ece_after is None else f", on test {self.test_ece_after:.3f}"
            return (f"skipped ({self.skipped}), so the probabilities stay as the model gives "
                    f"them (expected calibration error on val {self.val_ece_before:.3f}"
                    f"{on_test})")
        return (f"temperature {self.temperature:.2f}; expected calibration error on val "
                f"{self.val_ece_before:.3f} -> {self.val_ece_after:.3f}{on_test}")


def _against_probe(won: bool) -> str:
    return "beat the probe beyond noise" if won else "within noise of the probe"


@dataclass(frozen=True, kw_only=True)
class CandidateRecord:
    """A candidate fitted after the probe and before the stages (training/candidates: the
    probe variant, the combined and the self-trained probes): what it is, how it did on val
    against the probe, and the numbers its kind records."""

    name: str  # as the choice names it
    kind: str  # its row in the candidates table
    summary: str  # what it is and how it was fitted
    val_correct: int
    won: bool  # beat the probe on val by more than noise
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.summary}: {self.val_correct} right on val, {_against_probe(self.won)}"


def _candidates_of_format_3(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Run format 3 recorded the probe variant, the combined and the self-trained probes in
    fields of their own; format 4 lists them as candidates, worded as a run writes them."""
    found = []
    variant, combined, pool = (values.get(k) for k in ("variant", "combined", "self_trained"))
    if isinstance(variant, Mapping):
        where = (f"after block {variant.get('blocks')}" if variant.get("name") == "earlier-block"
                 else f"at {variant.get('base_size')} px")
        found.append(("variant", variant, f"Probe on the features {where} (the data checks' "
                                           f"pick), C={variant.get('c')}",
                      ("blocks", "base_size", "c")))
    if isinstance(combined, Mapping):
        found.append(("combined", {**combined, "name": "combined"},
                      f"Combined probe on {', '.join(combined.get('bases', ()))} side by side, "
                      f"C={combined.get('c')}", ("bases", "c")))
    if isinstance(pool, Mapping):
        found.append(("self-trained", {**pool, "name": "self-trained"},
                      f"Self-trained probe, {pool.get('pseudo_labelled')} of "
                      f"{pool.get('images')} pool images pseudo-labelled and "
                      f"{pool.get('unlike')} left out as unlike every class, C={pool.get('c')}",
                      ("pool", "images", "unreadable", "pseudo_labelled", "unlike", "c")))
    return [{"name": old.get("name"), "kind": kind, "summary": summary,
             "val_correct": old.get("val_correct"), "won": old.get("won"),
             "seconds": old.get("seconds"), "details": {k: old.get(k) for k in keep}}
            for kind, old, summary, keep in found]


@dataclass(frozen=True, kw_only=True)
class Refit:
    """The kept model fitted again on train and val together, once chosen: the saved model
    learnt from val, so val scores are of the model before the refit (which val chose), and
    only test is held out from the saved model."""

    model: str  # the kept candidate that was refitted
    images: int  # train + val (and pool images a pool candidate labelled)
    seconds: float
    epochs: int = 0  # a fine-tuned model's: its stages trained again up to the kept epoch


@dataclass(frozen=True, kw_only=True)
class NoveltyRecord:
    """The "none of these" score fitted for the kept model (novelty.py; RUN/novelty.npz):
    `predict` gives every image a novelty score, and above `threshold` calls it unknown with
    --reject-unknown; val set the threshold so that `accept` of its images fall below it."""

    k: int
    threshold: float
    accept: float
    bank: int  # training images whose features the score compares with
    val_images: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class CrossValidation:
    """A cv run: stratified K-fold cross-validation of the recipe. Each fold chose its
    epochs and candidates on an inner val split of its training folds, so every fold's
    score (on the fold it never saw) is held out."""

    folds: int
    fold_scores: tuple[Score, ...]  # of the folds done so far, while it runs
    mean: float | None = None  # of the fold accuracies, once every fold is done
    sd: float | None = None


@dataclass(frozen=True, kw_only=True)
class Compute:
    """How the hardware was used (resolved, not as asked)."""

    precision: str = "float32"  # float32 | mixed
    jit: bool = False
    strategy: str = "none"  # the tf.distribute strategy's class name, or none
    replicas: int = 1


@dataclass(frozen=True, kw_only=True)
class SkippedRecord:
    path: str  # as found, relative or absolute
    reason: str


@dataclass(frozen=True, kw_only=True)
class DataSummary:
    """What the run saw of its data folder."""

    presplit: bool
    counts: dict[str, dict[str, int]]  # split -> class -> images
    converted: int  # images read through a plain RGB copy
    skipped: tuple[SkippedRecord, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Stopped:
    """Where an interrupted run stopped: in a stage after an epoch, or in a phase before the
    stages (reading the data, the probe, the combined or self-trained candidate, the data
    checks)."""

    stage: str | None = None
    epoch: int | None = None
    signal: str | None = None  # None: stopped by an error, which `failure` names
    phase: str = "training"


@dataclass(frozen=True, kw_only=True)
class LRFind:
    """The learning-rate range test a run started with."""

    learning_rates: tuple[float, ...]
    losses: tuple[float, ...]
    suggestion: float
    rule: str  # how the suggestion was picked
    at_edge: bool  # the lowest loss sat at the top of the range tried


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a finetune run decided, once, after its data was read and its data checks ran:
    every value its stages train with. The config beside it stays as the user gave it."""

    learning_rate: float  # the head stage's (lr-find's suggestion with --lr-find)
    unfreeze_blocks: int  # fine-tuned from the top (0: no fine-tuning stage)
    finetune_epochs: int | None = None  # the most (None in runs before it: the config's)
    finetune_lr: float
    schedule: ScheduleConfig
    finetune_schedule: ScheduleConfig
    augment: AugmentConfig  # left-right flips decided
    class_weights: dict[str, float] | None = None  # balanced weights, when classes differ
    label_smoothing: float | None = None  # None in runs before it: the config's
    stood: tuple[str, ...] = ()  # options the user set that stand over the data checks


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """run.json: everything a run directory says about itself. `config` is as the user gave
    it; what was decided from it is `image_size`, `base` and (finetune, cv) the `plan`."""

    command: str  # finetune | extract | cv
    config: FinetuneConfig | ExtractConfig
    base: str
    base_layer: str  # the base's layer name inside the model's `features` model
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    image_size: int  # the one used
    plan: Plan | None = None  # finetune and cv, once the data checks ran
    compute: Compute = field(default_factory=Compute)
    data: DataSummary
    status: str = RUNNING
    trainable_params: dict[str, int] = field(default_factory=dict)  # per stage
    stages: tuple[StageResult, ...] = ()
    kept_stage: str | None = None  # whose weights model.keras has
    metrics: dict[str, float] = field(default_factory=dict)  # of the kept stage's best epoch
    scores: tuple[Score, ...] = ()  # the kept model's accuracy per split, with intervals
    lr_find: LRFind | None = None
    probe: ProbeRecord | None = None
    candidates: tuple[CandidateRecord, ...] = ()  # fitted after the probe, in the run's order
    adaptation: Adaptation | None = None
    choice: Choice | None = None
    calibration: Calibration | None = None
    refit: Refit | None = None
    novelty: NoveltyRecord | None = None
    cross_validation: CrossValidation | None = None
    stopped: Stopped | None = None
    failure: str | None = None  # why a failed run stopped
    versions: dict[str, str] = field(default_factory=dict)  # set when saved
    updated: str = ""  # set when saved

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data.data_dir)

    @property
    def rollback(self) -> bool:
        """Whether the kept model is an earlier stage's than the last one run."""
        return bool(self.stages) and self.kept_stage != self.stages[-1].name

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["config"] = to_dict(self.config)
        plain = json.loads(json.dumps(values, default=_plain))
        return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **plain}

    def candidate(self, name: str) -> CandidateRecord | None:
        """The candidate fitted after the probe named `name`, if one was."""
        return next((c for c in self.candidates if c.name == name), None)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], version: int = 4) -> RunRecord:
        """A record from run.json's content of run format `version` (3 or 4), validated.

        Raises:
            ConfigError: a missing or invalid field (the caller names the file).
        """
        if version == 3:
            values = {**{k: v for k, v in values.items()
                         if k not in ("variant", "combined", "self_trained")},
                      "candidates": _candidates_of_format_3(values)}
        values = {k: v for k, v in values.items() if k not in ("format", "format_version")}
        command = values.get("command")
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}")
        config = values.get("config")
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a table of settings; got {config!r}")
        config = from_dict(COMMANDS[command], config, prefix="config.")
        record = from_dict(cls, values, ready={"config": config})
        if record.image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels; got "
                              f"{record.image_size!r}")
        names = record.class_names
        if len(names) < 2 or len(set(names)) != len(names) or not all(
                isinstance(n, str) and fits_one_line(n) for n in names):
            raise ConfigError(f"class_names must be two or more distinct names without line "
                              f"breaks or control characters; got {names!r}")
        if record.status not in STATUSES:
            raise ConfigError(f"status must be one of {', '.join(STATUSES)}; got "
                              f"{record.status!r}")
        pre = record.preprocessing
        if pre.channel_order not in ("rgb", "bgr") or len(pre.mean) != 3 or len(pre.std) != 3:
            raise ConfigError(f"invalid preprocessing {pre!r}")
        return record


def _plain(value: Any) -> Any:
    """JSON for what json does not know: dataclasses, paths, tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to run.json")

