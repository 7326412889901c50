"""Frozen, validated configuration per command. Defaults live here, once; the CLI reads them."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transferkit.errors import ConfigError

DEFAULT_BASE = "efficientnet_lite0"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_precision(precision: str) -> None:
    _check(precision in PRECISIONS,
           f"--precision must be one of {', '.join(PRECISIONS)}; got {precision}.")


@dataclass(frozen=True)
class AugmentConfig:
    """ImageDataGenerator-style augmentation, in its units (degrees and fractions)."""

    enabled: bool = True
    rotation_range: float = 40.0
    width_shift_range: float = 0.2
    height_shift_range: float = 0.2
    shear_range: float = 0.2
    zoom_range: float = 0.2
    horizontal_flip: bool = True
    vertical_flip: bool = False
    brightness_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split and sized."""

    data_dir: Path
    image_size: int | None = None  # None: the base's default
    val_split: float = 0.2
    batch_size: int = 32
    seed: int = 1337

    def __post_init__(self) -> None:
        _check(0 < self.val_split < 1,
               f"--val-split must be strictly between 0 and 1; got {self.val_split}.")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        _check(self.image_size is None or self.image_size >= 1,
               f"--image-size must be a positive number of pixels; got {self.image_size}.")


PRECISIONS = ("auto", "float32", "mixed")
PREDICTION_FORMATS = (".csv", ".json", ".jsonl")
DEFAULT_PRECISION = "auto"  # mixed float16 on GPUs with tensor cores, else float32
STRATEGIES = ("auto", "none", "mirrored", "multiworker")


@dataclass(frozen=True)
class ComputeConfig:
    """How the hardware is used."""

    precision: str = DEFAULT_PRECISION
    jit: bool = False  # XLA-compile training steps
    strategy: str = "auto"  # auto: mirrored across local GPUs when there are several

    def __post_init__(self) -> None:
        _check_precision(self.precision)
        _check(self.strategy in STRATEGIES, f"--strategy must be one of "
                                            f"{', '.join(STRATEGIES)}; got {self.strategy}.")


OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "inverse-time", "cosine")
INITS = ("auto", "he", "glorot")
CLASS_WEIGHTS = ("auto", "balanced", "none")
MONITORS = ("val_loss", "val_accuracy")


@dataclass(frozen=True)
class ScheduleConfig:
    """A learning-rate schedule over one stage, stepped once per epoch."""

    name: str = "cosine"
    warmup_epochs: int = 0
    decay_rate: float | None = None  # None: the schedule's own default
    decay_epochs: int | None = None  # step schedule: epochs per step (None: a third)

    def __post_init__(self) -> None:
        _check(self.name in SCHEDULES, f"Unknown schedule '{self.name}'. Choose one of: "
                                       f"{', '.join(SCHEDULES)}.")
        _check(self.warmup_epochs >= 0,
               f"--warmup-epochs must be 0 or more; got {self.warmup_epochs}.")
        _check(self.decay_rate is None or self.decay_rate > 0,
               f"--decay-rate must be > 0; got {self.decay_rate}.")
        _check(self.decay_epochs is None or self.decay_epochs >= 1,
               f"--decay-epochs must be at least 1; got {self.decay_epochs}.")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    momentum: float = 0.9  # SGD and RMSprop
    nesterov: bool = True  # SGD

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, f"Unknown optimizer '{self.name}'. Choose one of: "
                                        f"{', '.join(OPTIMIZERS)}.")
        _check(0 <= self.momentum < 1, f"--momentum must be in [0, 1); got {self.momentum}.")


@dataclass(frozen=True)
class FinetuneConfig:
    """`transferkit finetune`: train a head on a frozen base, then tune the top blocks."""

    data: DataConfig
    output: Path | None  # None only for diagnostics that write no run (--overfit-check)
    base: str = DEFAULT_BASE
    weights: str = "imagenet"
    epochs: int = 20
    learning_rate: float = 1e-3
    finetune_epochs: int = 10
    finetune_lr: float | None = None  # None: a tenth of learning_rate
    unfreeze_blocks: int = 2
    train_batchnorm: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Stage 1 keeps its rate (a fresh head is far from converged); stage 2 anneals it.
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant"))
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
        _check(self.epochs >= 1, f"--epochs must be at least 1; got {self.epochs}.")
        _check(self.finetune_epochs >= 0,
               f"--finetune-epochs must be 0 or more; got {self.finetune_epochs}.")
        _check(self.learning_rate > 0, f"--learning-rate must be > 0; got {self.learning_rate}.")
        _check(self.finetune_lr is None or self.finetune_lr > 0,
               f"--finetune-lr must be > 0; got {self.finetune_lr}.")
        _check(self.unfreeze_blocks >= 1 or self.finetune_epochs == 0,
               f"--unfreeze-blocks must be at least 1 when fine-tuning; got "
               f"{self.unfreeze_blocks}. Use --finetune-epochs 0 to train the head only.")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}.")
        _check(self.l2 >= 0, f"--l2 must be 0 or more; got {self.l2}.")
        _check(self.dense_units >= 0, f"--dense-units must be 0 or more; got {self.dense_units}.")
        _check(self.init in INITS, f"--init must be one of {', '.join(INITS)}; got {self.init}.")
        _check(self.class_weight in CLASS_WEIGHTS, f"--class-weight must be one of "
                                                   f"{', '.join(CLASS_WEIGHTS)}; got "
                                                   f"{self.class_weight}.")
        _check(self.monitor in MONITORS, f"--monitor must be one of {', '.join(MONITORS)}; got "
                                         f"{self.monitor}.")
        _check(self.patience >= 0, f"--patience must be 0 or more; got {self.patience}.")

    @property
    def resolved_finetune_lr(self) -> float:
        """Stage 2's rate: as given, else a tenth of stage 1's."""
        return self.finetune_lr if self.finetune_lr is not None else self.learning_rate / 10


@dataclass(frozen=True)
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
        _check(self.dense_units >= 0, f"--dense-units must be 0 or more; got {self.dense_units}.")
        _check(self.patience >= 1, f"patience must be at least 1; got {self.patience}.")
        _check(self.l2 >= 0, f"--l2 must be 0 or more; got {self.l2}.")
        _check(self.init in INITS, f"--init must be one of {', '.join(INITS)}; got {self.init}.")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}.")
        _check(self.epochs >= 1, f"--head-epochs must be at least 1; got {self.epochs}.")
        _check(self.learning_rate > 0, f"--learning-rate must be > 0; got {self.learning_rate}.")


@dataclass(frozen=True)
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
        _check(self.blocks is None or self.blocks >= 1,
               f"--blocks must be at least 1; got {self.blocks}.")
        _check(self.pooling in ("avg", "max"), f"--pooling must be avg or max; got {self.pooling}.")
        _check_precision(self.precision)


@dataclass(frozen=True)
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
        _check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        _check(self.gallery >= 0, f"--gallery must be 0 or more; got {self.gallery}.")


EXPORT_FORMATS = {"savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}  # -> file suffix
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


@dataclass(frozen=True)
class ExportConfig:
    """`transferkit export`: a run's model for deployment, checked against Keras."""

    run_dir: Path
    output: Path
    format: str = "savedmodel"
    quantize: str = "none"  # TFLite only
    check_images: int = 16  # run through both models to compare
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check(self.format in EXPORT_FORMATS, f"--format must be one of "
                                               f"{', '.join(EXPORT_FORMATS)}; got {self.format}.")
        _check(self.quantize in QUANTIZATIONS, f"--quantize must be one of "
                                               f"{', '.join(QUANTIZATIONS)}; got {self.quantize}.")
        _check(self.quantize == "none" or self.format == "tflite",
               f"--quantize applies to --format tflite only; got --format {self.format} "
               f"--quantize {self.quantize}.")
        suffix = EXPORT_FORMATS[self.format]
        _check(not suffix or self.output.suffix.lower() == suffix,
               f"--format {self.format} writes one file; name it with {suffix} "
               f"(got '{self.output}').")
        _check(self.check_images >= 1,
               f"--check-images must be at least 1; got {self.check_images}.")


@dataclass(frozen=True)
class PredictConfig:
    """`transferkit predict`: a run directory applied to files and folders."""

    run_dir: Path
    paths: tuple[Path, ...]
    top_k: int = 1
    batch_size: int = 32
    output: Path | None = None
    overwrite: bool = False
    tta: bool = False  # average over ten crops (corners, centre, mirrored)
    threshold: float | None = None  # below this top probability the label is "unknown"

    def __post_init__(self) -> None:
        _check(len(self.paths) > 0, "Give at least one image file or folder to predict.")
        _check(self.threshold is None or 0.0 < self.threshold <= 1.0,
               f"--threshold must be a probability in (0, 1]; got {self.threshold}.")
        _check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        _check(self.output is None or self.output.suffix.lower() in PREDICTION_FORMATS,
               f"--output must end in {', '.join(PREDICTION_FORMATS)}; got '{self.output}'.")


T = TypeVar("T")


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Turns a JSON/TOML value into the type a config field declares."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
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


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Builds a config dataclass from plain data (run.json, a config file); validates it.

    Raises:
        ConfigError: an unknown setting, or a value the config refuses.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + u for u in unknown)}.")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in values.items()})
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
