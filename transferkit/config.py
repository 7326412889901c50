"""Frozen, validated configuration per command. Defaults live here, once; the CLI reads them."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transferkit.errors import ConfigError

DEFAULT_BASE = "efficientnet_lite0"
TOP_BLOCKS = 2  # blocks fine-tuned unless the data or --unfreeze-blocks says otherwise


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_finite(config: Any) -> None:
    """Every number in a config is finite: inf or nan would pass a range check such as
    `> 0` and train to NaN."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number; "
                                  f"got {value}.")


def _check_precision(precision: str) -> None:
    _check(precision in PRECISIONS,
           f"--precision must be one of {', '.join(PRECISIONS)}; got {precision}.")


def option(default: Any, help: str, flag: str | None = None) -> Any:  # noqa: A002
    """A config field that is also a command-line option: the CLI declares it from here
    (`--field-name`, or `flag`), so adding a field adds the option."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """ImageDataGenerator-style augmentation, in its units (degrees and fractions). Each field
    is a finetune and augment-preview option."""

    enabled: bool = option(True, "Augment training batches.", flag="--augment/--no-augment")
    rotation_range: float = option(40.0, "Random rotation, degrees.")
    width_shift_range: float = option(0.2, "Random horizontal shift, fraction of the width.")
    height_shift_range: float = option(0.2, "Random vertical shift, fraction of the height.")
    shear_range: float = option(0.2, "Random shear angle, degrees.")
    zoom_range: float = option(0.2, "Random zoom between 1-Z and 1+Z.")
    # None: on, unless finetune's data checks find that left and right carry the label
    horizontal_flip: bool | None = option(
        None, "Random left-right flips; by default on, unless the data checks find that "
              "mirroring changes labels.")
    vertical_flip: bool = option(False, "Random up-down flips.")
    brightness_range: tuple[float, float] | None = option(
        None, "Random brightness factor between LOW and HIGH, e.g. 0.8 1.2.")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0 <= self.rotation_range <= 180, f"--rotation-range is in degrees and must be in "
                                                f"[0, 180]; got {self.rotation_range}.")
        for name in ("width_shift_range", "height_shift_range"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"--{name.replace('_', '-')} is a fraction of the image and "
                                   f"must be in [0, 1); got {value}.")
        _check(0 <= self.shear_range < 45,
               f"--shear-range is in degrees and must be in [0, 45); got {self.shear_range}.")
        _check(0 <= self.zoom_range < 1,
               f"--zoom-range must be in [0, 1) (0.2 zooms between 0.8x and 1.2x); "
               f"got {self.zoom_range}.")
        if self.brightness_range is not None:
            low, high = self.brightness_range
            _check(0 < low <= high,
                   f"--brightness-range takes two factors 0 < LOW <= HIGH (e.g. 0.8 1.2); "
                   f"got {low} {high}.")


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """`transferkit augment-preview`: a grid of training images and augmented draws."""

    data: DataConfig
    output: Path
    base: str = DEFAULT_BASE
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    images: int = 4  # rows: training images, one per class in turn
    variants: int = 6  # augmented draws per image, after the original
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.images >= 1, f"--images must be at least 1; got {self.images}.")
        _check(self.variants >= 1, f"--variants must be at least 1; got {self.variants}.")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images are and how they are split and sized."""

    data_dir: Path
    image_size: int | None = None  # None: the base's default
    val_split: float = 0.2
    batch_size: int = 32
    seed: int = 1337

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0 < self.val_split < 1,
               f"--val-split must be strictly between 0 and 1; got {self.val_split}.")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        _check(self.image_size is None or self.image_size >= 1,
               f"--image-size must be a positive number of pixels; got {self.image_size}.")


PRECISIONS = ("auto", "float32", "mixed")
PREDICTION_FORMATS = ("csv", "json", "jsonl")
STDOUT = Path("-")  # an output path that means standard output
DEFAULT_PRECISION = "auto"  # mixed float16 on GPUs with tensor cores, else float32
STRATEGIES = ("auto", "none", "mirrored", "multiworker")


@dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    """How the hardware is used."""

    precision: str = DEFAULT_PRECISION
    jit: bool = False  # XLA-compile training steps
    strategy: str = "auto"  # auto: mirrored across local GPUs when there are several

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_precision(self.precision)
        _check(self.strategy in STRATEGIES, f"--strategy must be one of "
                                            f"{', '.join(STRATEGIES)}; got {self.strategy}.")
        _check(self.strategy != "multiworker",
               "--strategy multiworker is not available: Keras 3's fit fails under "
               "TensorFlow's MultiWorkerMirroredStrategy (keras-team/keras#20585: first while "
               "building the model from a distributed batch, then while averaging each step's "
               "losses across workers). Train on one machine: --strategy mirrored uses all of "
               "its GPUs.")


OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "inverse-time", "cosine")
INITS = ("auto", "he", "glorot")
CLASS_WEIGHTS = ("auto", "balanced", "none")
MONITORS = ("val_loss", "val_accuracy")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """A learning-rate schedule over one stage, stepped once per epoch."""

    name: str = "cosine"
    warmup_epochs: int = 0
    decay_rate: float | None = None  # None: the schedule's own default
    decay_epochs: int | None = None  # step schedule: epochs per step (None: a third)

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.name in SCHEDULES, f"Unknown schedule '{self.name}'. Choose one of: "
                                       f"{', '.join(SCHEDULES)}.")
        _check(self.warmup_epochs >= 0,
               f"--warmup-epochs must be 0 or more; got {self.warmup_epochs}.")
        _check(self.decay_rate is None or self.decay_rate > 0,
               f"--decay-rate must be > 0; got {self.decay_rate}.")
        _check(self.decay_epochs is None or self.decay_epochs >= 1,
               f"--decay-epochs must be at least 1; got {self.decay_epochs}.")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: str = "adam"
    momentum: float = 0.9  # SGD and RMSprop
    nesterov: bool = True  # SGD

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.name in OPTIMIZERS, f"Unknown optimizer '{self.name}'. Choose one of: "
                                        f"{', '.join(OPTIMIZERS)}.")
        _check(0 <= self.momentum < 1, f"--momentum must be in [0, 1); got {self.momentum}.")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """`transferkit finetune`: train a head on a frozen base, then tune the top blocks."""

    data: DataConfig
    output: Path | None  # None only for diagnostics that write no run (--overfit-check)
    base: str = DEFAULT_BASE
    weights: str = "imagenet"
    # The linear probe gives the head its weights; --epochs trains it further on the frozen
    # base (with augmentation) before the top blocks are tuned.
    epochs: int = 0
    learning_rate: float = 1e-3
    finetune_epochs: int = 10
    finetune_lr: float | None = None  # None: a tenth of learning_rate
    unfreeze_blocks: int | None = None  # None: TOP_BLOCKS, or all when adapt finds it deep
    adapt: bool = True  # decide depth and flips from the training data (training.adaptation)
    train_batchnorm: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Stage 1 keeps its rate (a fresh head is far from converged); stage 2 anneals it.
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="constant"))
    finetune_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dropout: float = 0.2
    l2: float = 0.0
    dense_units: int = 0  # 0: a linear (softmax) head
    init: str = "auto"  # auto: He for ReLU layers, Glorot for the softmax
    class_weight: str = "auto"  # auto: balanced when classes differ beyond 1.5:1
    monitor: str = "val_accuracy"  # ties go to the lower val_loss
    patience: int = 5  # epochs without improvement before a stage stops; 0: never
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tensorboard: bool = False
    lr_find: bool = False  # range test first; its suggestion becomes learning_rate
    cache: bool = True  # --no-augment: stage 1 reuses cached features of unchanged images
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.epochs >= 0, f"--epochs must be 0 or more; got {self.epochs}.")
        _check(self.finetune_epochs >= 0,
               f"--finetune-epochs must be 0 or more; got {self.finetune_epochs}.")
        _check(self.learning_rate > 0, f"--learning-rate must be > 0; got {self.learning_rate}.")
        _check(self.finetune_lr is None or self.finetune_lr > 0,
               f"--finetune-lr must be > 0; got {self.finetune_lr}.")
        _check(self.unfreeze_blocks is None or self.unfreeze_blocks >= 1
               or self.finetune_epochs == 0,
               f"--unfreeze-blocks must be at least 1 when fine-tuning; got "
               f"{self.unfreeze_blocks}. Use --finetune-epochs 0 to train the head only.")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}.")
        _check(self.l2 >= 0, f"--l2 must be 0 or more; got {self.l2}.")
        _check(self.dense_units >= 0, f"--dense-units must be 0 or more; got {self.dense_units}.")
        _check(not (self.dense_units and self.finetune_epochs and not self.epochs),
               f"--dense-units {self.dense_units} adds a hidden layer that the linear probe "
               f"cannot initialise, so it must be trained before fine-tuning: pass --epochs N "
               f"(e.g. --epochs 20).")
        _check(self.init in INITS, f"--init must be one of {', '.join(INITS)}; got {self.init}.")
        _check(self.class_weight in CLASS_WEIGHTS, f"--class-weight must be one of "
                                                   f"{', '.join(CLASS_WEIGHTS)}; got "
                                                   f"{self.class_weight}.")
        _check(self.monitor in MONITORS, f"--monitor must be one of {', '.join(MONITORS)}; got "
                                         f"{self.monitor}.")
        _check(self.patience >= 0, f"--patience must be 0 or more; got {self.patience}.")

    @property
    def resolved_unfreeze_blocks(self) -> int:
        """Stage 2's depth: as given (or as adaptation set it), else the top TOP_BLOCKS."""
        return self.unfreeze_blocks if self.unfreeze_blocks is not None else TOP_BLOCKS

    @property
    def resolved_finetune_lr(self) -> float:
        """Stage 2's rate: as given, else a tenth of stage 1's."""
        return self.finetune_lr if self.finetune_lr is not None else self.learning_rate / 10


@dataclass(frozen=True, kw_only=True)
class CVConfig:
    """`transferkit cv`: stratified K-fold cross-validation of the finetune recipe. The
    recipe's data is DATA and its output the ensemble run directory."""

    recipe: FinetuneConfig
    folds: int = 5

    def __post_init__(self) -> None:
        _check(self.folds >= 2, f"--folds must be at least 2; got {self.folds}.")


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """`transferkit audit`: label issues, near-duplicates and outliers of a data folder."""

    data: DataConfig
    output: Path
    base: str = DEFAULT_BASE
    weights: str = "imagenet"
    # perceptual similarity from which two images are near-duplicates; measured on planted
    # resized, re-encoded and 5 %-cropped copies in five sets, which all scored 0.98 or more
    duplicate_similarity: float = 0.975
    cache: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0 < self.duplicate_similarity <= 1,
               f"--duplicate-similarity must be in (0, 1]; got {self.duplicate_similarity}.")


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The dense classifier `extract --train-head` trains on saved features."""

    output: Path
    dense_units: int = 256
    dropout: float = 0.5
    epochs: int = 30
    learning_rate: float = 1e-3
    l2: float = 0.0
    init: str = "auto"
    patience: int = 10  # epochs without val_loss improvement; the best epoch is kept
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.dense_units >= 0, f"--dense-units must be 0 or more; got {self.dense_units}.")
        _check(self.patience >= 1, f"patience must be at least 1; got {self.patience}.")
        _check(self.l2 >= 0, f"--l2 must be 0 or more; got {self.l2}.")
        _check(self.init in INITS, f"--init must be one of {', '.join(INITS)}; got {self.init}.")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}.")
        _check(self.epochs >= 1, f"--head-epochs must be at least 1; got {self.epochs}.")
        _check(self.learning_rate > 0, f"--learning-rate must be > 0; got {self.learning_rate}.")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """`transferkit extract`: frozen-base features to a file, optionally a head on them."""

    data: DataConfig
    output: Path
    base: str = DEFAULT_BASE
    weights: str = "imagenet"
    blocks: int | None = None  # None: the whole base
    pooling: str = "avg"
    precision: str = DEFAULT_PRECISION
    cache: bool = True  # reuse features computed before for unchanged images
    overwrite: bool = False
    head: HeadConfig | None = None

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.blocks is None or self.blocks >= 1,
               f"--blocks must be at least 1; got {self.blocks}.")
        _check(self.pooling in ("avg", "max"), f"--pooling must be avg or max; got {self.pooling}.")
        _check_precision(self.precision)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """`transferkit evaluate`: metrics of a run on labelled images."""

    run_dir: Path
    data_dir: Path | None = None  # None: the run's own validation split
    output: Path | None = None  # None: RUN/evaluation
    top_k: int = 3
    batch_size: int = 32
    gallery: int = 16  # how many confidently wrong images to show
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        _check(self.gallery >= 0, f"--gallery must be 0 or more; got {self.gallery}.")


QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """`transferkit export`: a run's model for deployment, checked against Keras."""

    run_dir: Path
    output: Path
    format: str = "savedmodel"  # a row of export.FORMATS, which checks it and the suffix
    quantize: str = "none"  # TFLite only
    check_images: int = 16  # run through both models to compare
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.quantize in QUANTIZATIONS, f"--quantize must be one of "
                                               f"{', '.join(QUANTIZATIONS)}; got {self.quantize}.")
        _check(self.quantize == "none" or self.format == "tflite",
               f"--quantize applies to --format tflite only; got --format {self.format} "
               f"--quantize {self.quantize}.")
        _check(self.check_images >= 1,
               f"--check-images must be at least 1; got {self.check_images}.")


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """`transferkit predict`: a run directory applied to files and folders."""

    run_dir: Path
    paths: tuple[Path, ...]
    top_k: int = 1
    batch_size: int = 32
    output: Path | None = None  # None: a table on a terminal, else CSV; STDOUT: stdout
    format: str | None = None  # csv | json | jsonl; None: from the output's suffix
    overwrite: bool = False
    tta: bool = False  # average over ten crops (corners, centre, mirrored)
    threshold: float | None = None  # below this top probability the label is "unknown"

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(len(self.paths) > 0, "Give at least one image file or folder to predict.")
        _check(self.threshold is None or 0.0 < self.threshold <= 1.0,
               f"--threshold must be a probability in (0, 1]; got {self.threshold}.")
        _check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        _check(self.format is None or self.format in PREDICTION_FORMATS,
               f"--format must be one of {', '.join(PREDICTION_FORMATS)}; got {self.format}.")
        _check(self.format is not None or self.output in (None, STDOUT)
               or self.output.suffix.lower().lstrip(".") in PREDICTION_FORMATS,
               f"--output must end in .{', .'.join(PREDICTION_FORMATS)}, or pass --format; "
               f"got '{self.output}'.")

    def output_format(self, terminal: bool) -> str | None:
        """How predictions are written: csv, json or jsonl, or None for a table (only when
        they go to a terminal)."""
        if self.format is not None:
            return self.format
        if self.output is None or self.output == STDOUT:
            return None if terminal and self.output is None else "csv"
        return self.output.suffix.lower().lstrip(".")


T = TypeVar("T")


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Turns a JSON/TOML value into the type a config field declares."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if hint is Any or type(None) in args:
            return None
        raise ConfigError(f"Setting '{name}' must not be null.")
    if origin in (typing.Union, types.UnionType):
        return _coerce(next(a for a in args if a is not type(None)), value, name)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"Setting '{name}' must be a table of settings; got {value!r}.")
        return from_dict(hint, value, prefix=f"{name}.")
    if hint is Path:
        return Path(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Setting '{name}' must be a list; got {value!r}.")
        inner = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_coerce(h, v, name) for h, v in zip(inner, value, strict=True))
    return value


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "",
              ready: Mapping[str, Any] | None = None) -> T:
    """Builds a config dataclass from plain data (run.json, a config file); validates it.
    `ready` holds fields already built (taken as they are).

    Raises:
        ConfigError: an unknown, missing or invalid setting.
    """
    ready = ready or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + u for u in unknown)}.")
    hints = typing.get_type_hints(cls)
    coerced = {k: _coerce(hints[k], v, prefix + k) for k, v in values.items() if k not in ready}
    try:
        return cls(**coerced, **ready)
    except TypeError as exc:
        raise ConfigError(f"Incomplete settings for {cls.__name__}: {exc}.") from exc


def default(cls: type, name: str) -> Any:
    """The default of a config field, so CLI options never re-type a literal."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{cls.__name__} has no default for {name!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready view of a config (paths as strings, tuples as lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))
