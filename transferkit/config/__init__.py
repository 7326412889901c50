"""Frozen, validated configuration per command. Defaults live here, once; the CLI reads them.
The framework they are declared in (`option`, `group`, reading and writing them) is
fields.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transferkit.config.fields import check, check_finite, group, option
from transferkit.config.fields import from_dict as from_dict  # its readers' one import
from transferkit.config.fields import to_dict as to_dict

DEFAULT_BASE = "efficientnet_lite0"
TOP_BLOCKS = 2  # blocks fine-tuned unless the data or --unfreeze-blocks says otherwise


def _check_suffix(path: Path | None, option: str, suffix: str, what: str) -> None:
    """An output file is named for what is written into it, so that no tool (or user) reads
    one format under another's name; checked before any work."""
    check(path is None or path.suffix.lower() == suffix,
          f"{option} writes {what}; name it with {suffix} (got '{path}').")


MAX_SEED = 2**32 - 1  # numpy's and TensorFlow's seeds are unsigned 32-bit


def _check_seed(seed: int) -> None:
    check(0 <= seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED}; got "
                                  f"{seed}.")


def _check_precision(precision: str) -> None:
    check(precision in PRECISIONS,
          f"--precision must be one of {', '.join(PRECISIONS)}; got {precision}.")


# Help panels: where an option is listed in --help.
DATA, MODEL, TRAIN, OPTIMISE, AUGMENT, CHECKS, OUTPUT, HARDWARE = (
    "Data", "Base model", "Training", "Optimisation", "Augmentation",
    "Sanity checks", "Output", "Hardware")


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """ImageDataGenerator-style augmentation, in its units (degrees and fractions)."""

    enabled: bool = option(True, "Augment training batches.", flag="--augment/--no-augment",
                           advanced=False)
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
    mixup: float = option(
        0.0, "MixUp: blend pairs of training images and their labels, the weights drawn from "
             "Beta(A, A) (0.2 is common; 0: off).", metavar="A")
    cutmix: float = option(
        0.0, "CutMix: paste a patch of one training image into another, the labels mixed by "
             "area, the patch size drawn from Beta(A, A) (1.0 is common; 0: off).",
        metavar="A")
    randaugment: int = option(
        0, "RandAugment: this many random colour and shape operations per image, after the "
           "others (0: off; the paper uses 2).", metavar="OPS")

    def __post_init__(self) -> None:
        check_finite(self)
        # (horizontal_flip is left out: a run's plan records the flips it decided)
        asked = [name for name, on in (
            ("--mixup", self.mixup), ("--cutmix", self.cutmix),
            ("--randaugment", self.randaugment), ("--vertical-flip", self.vertical_flip),
            ("--brightness-range", self.brightness_range)) if on]
        check(self.enabled or not asked,
              f"--no-augment turns augmentation off, but {', '.join(asked)} asks for some. "
              f"Drop --no-augment, or drop {', '.join(asked)}.")
        check(0 <= self.rotation_range <= 180, f"--rotation-range is in degrees and must be in "
                                                f"[0, 180]; got {self.rotation_range}.")
        for name in ("width_shift_range", "height_shift_range"):
            value = getattr(self, name)
            check(0 <= value < 1, f"--{name.replace('_', '-')} is a fraction of the image and "
                                   f"must be in [0, 1); got {value}.")
        check(0 <= self.shear_range < 45,
              f"--shear-range is in degrees and must be in [0, 45); got {self.shear_range}.")
        check(0 <= self.zoom_range < 1,
              f"--zoom-range must be in [0, 1) (0.2 zooms between 0.8x and 1.2x); "
              f"got {self.zoom_range}.")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"--{name} is a Beta distribution's A, 0 to 1; got {value}.")
        check(0 <= self.randaugment <= 5, f"--randaugment is a number of operations per "
                                           f"image, 0 to 5; got {self.randaugment}.")
        if self.brightness_range is not None:
            low, high = self.brightness_range
            check(0 < low <= high,
                  f"--brightness-range takes two factors 0 < LOW <= HIGH (e.g. 0.8 1.2); "
                  f"got {low} {high}.")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images are and how they are split and sized."""

    data_dir: Path = option(
        help="Folder with one sub-folder per class, or with train/ and val/ (and test/) "
             "folders of class sub-folders.", argument=True, metavar="DATA")
    image_size: int | None = option(None, "Square input size in pixels. Default: the base's.")
    val_split: float = option(
        0.2, "Fraction of each class held out for validation when DATA has no val/.")
    batch_size: int = option(32, "Images per batch.")
    seed: int = option(1337, "Seed for every random choice: the val split, and when training, "
                             "the shuffling, augmentation and initial weights.")

    def __post_init__(self) -> None:
        check_finite(self)
        check(0 < self.val_split < 1,
              f"--val-split must be strictly between 0 and 1; got {self.val_split}.")
        check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        check(self.image_size is None or self.image_size >= 1,
              f"--image-size must be a positive number of pixels; got {self.image_size}.")
        _check_seed(self.seed)


AUTO_BASE = "auto"  # finetune: the best base of `bases --rank` on the data
PRECISIONS = ("auto", "float32", "mixed")
PREDICTION_FORMATS = ("csv", "json", "jsonl")
STDOUT = Path("-")  # an output path that means standard output
DEFAULT_PRECISION = "auto"  # mixed float16 on GPUs with tensor cores, else float32
STRATEGIES = ("auto", "none", "mirrored", "multiworker")
POOLINGS = ("avg", "max")
# export format -> the suffix of the file it writes ("" for a folder); export.FORMATS has a
# row for each
EXPORT_FORMATS = {"savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}
# what a savedmodel export folder holds (TensorFlow's files, the labels, transferkit.json)
SAVEDMODEL_FILES = ("saved_model.pb", "fingerprint.pb", "variables", "assets", "labels.txt",
                    "transferkit.json")
CACHE_HELP = ("Reuse features (and image checks) computed before for unchanged images; "
              "--no-cache recomputes everything.")
OVERWRITE_HELP = "Replace an existing output instead of refusing."
WEIGHTS_HELP = "'imagenet', 'none' (random init) or a Keras weights file for the base."
PRECISION_HELP = ("auto: mixed float16 on GPUs with tensor cores (the softmax stays float32); "
                  "float32; mixed.")


MAX_PREVIEW = 32  # rows or columns of the augment-preview grid: beyond it, a figure no one reads


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """`transferkit augment-preview`: a grid of training images and augmented draws."""

    data: DataConfig = group(panel=DATA)
    output: Path = option(help="PNG file to write.", short="-o", panel=OUTPUT)
    base: str = option(DEFAULT_BASE, "Pretrained convolutional base (its image size).",
                       choices="bases", panel=MODEL)
    augment: AugmentConfig = group(AugmentConfig, panel=AUGMENT)
    images: int = option(4, "How many training images (one per row, the classes in turn).",
                         panel=OUTPUT)
    variants: int = option(6, "Augmented draws per image, after the original.", panel=OUTPUT)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        check_finite(self)
        check(1 <= self.images <= MAX_PREVIEW,
              f"--images must be between 1 and {MAX_PREVIEW} (rows of one PNG); got "
              f"{self.images}.")
        check(1 <= self.variants <= MAX_PREVIEW,
              f"--variants must be between 1 and {MAX_PREVIEW} (columns of one PNG); got "
              f"{self.variants}.")
        _check_suffix(self.output, "-o/--output", ".png", "a PNG image")


@dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    """How the hardware is used."""

    precision: str = option(DEFAULT_PRECISION, PRECISION_HELP, choices=PRECISIONS)
    jit: bool = option(False, "XLA-compile the training steps.")
    strategy: str = option(
        "auto", "none; mirrored (all local GPUs); multiworker (finetune across machines, each "
                "process told its place by TF_CONFIG: docs/bases.md); auto: mirrored with "
                "several GPUs. --batch-size is per device.", choices=STRATEGIES)

    def __post_init__(self) -> None:
        check_finite(self)
        _check_precision(self.precision)
        check(self.strategy in STRATEGIES, f"--strategy must be one of "
                                            f"{', '.join(STRATEGIES)}; got {self.strategy}.")


RUNTIMES = ("auto", "onnx", "tf")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """What runs the forward passes that do not train (runtime.py)."""

    runtime: str = option("auto", "auto: ONNX Runtime on the CPU (1.6-1.9x TensorFlow's "
                                  "speed there), TensorFlow on a GPU or where onnxruntime is "
                                  "missing; onnx or tf: that one. Training runs on TensorFlow.",
                          choices=RUNTIMES)
    threads: int | None = option(None, "CPU threads for the forward passes and TensorFlow "
                                       "(default: every core this process may use); fewer "
                                       "to share the machine.")

    def __post_init__(self) -> None:
        check(self.runtime in RUNTIMES, f"--runtime must be one of {', '.join(RUNTIMES)}; got "
                                        f"{self.runtime}.")
        check(self.threads is None or 1 <= self.threads <= 1024,
              f"--threads must be between 1 and 1024; got {self.threads}.")


ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Where images go through a model for batch work (extract, predict, and the features
    of audit, select and bases --rank)."""

    engine: str = option("local", "local: this process; ray: the workers of a Ray cluster "
                                  "(--ray-address, else RAY_ADDRESS, else one started on "
                                  "this machine), each loading the model once. Needs "
                                  "transferkit[ray].", choices=ENGINES)
    ray_address: str | None = option(None, "The Ray cluster for --engine ray, e.g. "
                                           "ray://head:10001 or head:6379.")

    def __post_init__(self) -> None:
        check(self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}; got "
                                       f"{self.engine}.")
        check(self.ray_address is None or self.engine == "ray",
              f"--ray-address {self.ray_address} is for --engine ray; add it, or drop "
              f"--ray-address.")


OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "inverse-time", "cosine")
DECAYING = ("step", "exponential", "inverse-time")  # the schedules a decay rate applies to
INITS = ("auto", "he", "glorot")
CLASS_WEIGHTS = ("auto", "balanced", "none")
MONITORS = ("val_loss", "val_accuracy")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """A learning-rate schedule over one stage, stepped once per epoch."""

    name: str = option("cosine", "Learning-rate schedule of the stage, stepped per epoch.",
                       choices=SCHEDULES, named_by_group=True)
    warmup_epochs: int = option(0, "Epochs of linear warm-up.")
    decay_rate: float | None = option(
        None, "step: factor per step (0.5); exponential: factor per epoch (0.9); "
              "inverse-time: rate (0.5).")
    decay_epochs: int | None = option(
        None, "step: epochs per step (default: a third of the stage).")

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.name in SCHEDULES, f"Unknown schedule '{self.name}'. Choose one of: "
                                       f"{', '.join(SCHEDULES)}.")
        check(self.warmup_epochs >= 0,
              f"--warmup-epochs must be 0 or more; got {self.warmup_epochs}.")
        check(self.decay_rate is None or self.decay_rate > 0,
              f"--decay-rate must be > 0; got {self.decay_rate}.")
        check(self.decay_epochs is None or self.decay_epochs >= 1,
              f"--decay-epochs must be at least 1; got {self.decay_epochs}.")
        check(self.decay_rate is None or self.name in DECAYING,
              f"A decay rate applies to a {', '.join(DECAYING)} schedule; this stage's "
              f"schedule is {self.name}. (--decay-rate is the head stage's, "
              f"--finetune-decay-rate the fine-tuning stage's.)")
        check(self.decay_epochs is None or self.name == "step",
              f"Decay epochs apply to the step schedule; this stage's schedule is "
              f"{self.name}. (--decay-epochs is the head stage's, --finetune-decay-epochs "
              f"the fine-tuning stage's.)")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: str = option("adam", "Optimizer for every stage.", choices=OPTIMIZERS,
                       named_by_group=True)
    momentum: float = option(0.9, "Momentum (sgd, rmsprop).")
    nesterov: bool = option(True, "Nesterov momentum (sgd).")
    ema: float = option(
        0.0, "Keep an exponential moving average of the weights, each step M x average + "
             "(1 - M) x weights, and validate and keep the average (Polyak averaging; about "
             "0.9 for a few hundred steps, 0.99 for thousands; 0: off).", metavar="M")

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.name in OPTIMIZERS, f"Unknown optimizer '{self.name}'. Choose one of: "
                                        f"{', '.join(OPTIMIZERS)}.")
        check(0 <= self.momentum < 1, f"--momentum must be in [0, 1); got {self.momentum}.")
        check(0 <= self.ema < 1, f"--ema must be in [0, 1); got {self.ema}.")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """`transferkit finetune`: train a head on a frozen base, then tune the top blocks.
    As the user gave it: what transferkit decides lives in the run's Plan."""

    data: DataConfig = group(panel=DATA)
    # None only for diagnostics that write no run (--overfit-check)
    output: Path | None = option(help="Run directory to create.", short="-o", panel=OUTPUT)
    base: str = option(DEFAULT_BASE, "Pretrained convolutional base; auto: the best of "
                                     "`transferkit bases --rank DATA` (a probe on each "
                                     "available base's features).",
                       choices="bases+auto", panel=MODEL)
    weights: str = option("imagenet", WEIGHTS_HELP, panel=MODEL)
    # The linear probe gives the head its weights; --epochs trains it further on the frozen
    # base (with augmentation) before the top blocks are tuned.
    epochs: int = option(0, "Head stage: most epochs training the head further on the frozen "
                            "base, with augmentation, after the linear probe gave it its "
                            "weights (0: skip).", flag="--head-epochs", panel=TRAIN,
                         alias="--epochs")
    learning_rate: float = option(1e-3, "Head stage learning rate.", panel=OPTIMISE)
    finetune_epochs: int | None = option(
        None, "Most epochs with the top blocks unfrozen (0: skip). Default: 10, or 20 when the "
              "data checks find the data unlike the base's pretraining (every block is then "
              "tuned, and learns for longer).", panel=TRAIN)
    finetune_lr: float | None = option(
        None, "Fine-tuning learning rate. Default: a tenth of --learning-rate, so pretrained "
              "features survive.", panel=OPTIMISE)
    unfreeze_blocks: int | None = option(
        None, "How many blocks to fine-tune, from the top. Default: 2, or every block when "
              "the data checks find the data unlike the base's pretraining.", panel=TRAIN)
    unlabeled: Path | None = option(
        None, "Folder of unlabelled images (any depth of sub-folders). The probe also learns "
              "from the ones it is surest of, class by class (self-training; images unlike "
              "every class are left out): a candidate kept only when it beats the probe on "
              "val by more than noise.", metavar="POOL", panel=DATA)
    combine: bool = option(
        True, "Also try one linear probe on the features of every offline EfficientNet-Lite "
              "side by side (a candidate like the others, kept only when it wins on val by "
              "more than noise; its model runs every base).", flag="--combine/--no-combine",
        panel=TRAIN, advanced=True)
    label_smoothing: float | None = option(
        None, "Train toward 1 - E on the true class and E spread over all classes (Szegedy "
              "et al. 2016; 0: off). Default: 0.1 when the data checks find the data far "
              "from ImageNet (they tune every block), else 0.", metavar="E", panel=TRAIN,
        advanced=True)
    refit: bool = option(
        False, "Once the kept model is chosen, fit it again on train and val together, so it "
               "learns from every label: a probe in seconds (C chosen again), a fine-tuned "
               "model by training its stages again, each to the epoch it kept (about their "
               "time again). Off by default: it moved test scores by noise on the bench sets "
               "(bench/README.md).",
        flag="--refit/--no-refit", panel=TRAIN, advanced=True)
    adapt: bool = option(
        True, "Decide from the training data, in seconds, whether to fine-tune every block "
              "(raw pixels rival the frozen features) and whether to drop left-right flips "
              "(they change labels). --no-adapt: the top 2 blocks and the flips as given.",
        panel=TRAIN, advanced=True)
    train_batchnorm: bool = option(
        False, "Let unfrozen BatchNorm layers learn their scale and shift.",
        flag="--train-batchnorm/--freeze-batchnorm", panel=TRAIN, advanced=True)
    optimizer: OptimizerConfig = group(OptimizerConfig, panel=OPTIMISE, advanced=True)
    # The head stage keeps its rate (a fresh head is far from converged); fine-tuning anneals.
    schedule: ScheduleConfig = group(lambda: ScheduleConfig(name="constant"), panel=OPTIMISE,
                                     advanced=True)
    finetune_schedule: ScheduleConfig = group(ScheduleConfig, prefix="finetune_",
                                              panel=OPTIMISE, advanced=True)
    dropout: float = option(0.2, "Dropout before the softmax layer.", panel=TRAIN, advanced=True)
    l2: float = option(0.0, "L2 penalty on the head's weights (0: none).", panel=TRAIN,
                       advanced=True)
    dense_units: int = option(0, "Hidden ReLU units in the head (0: linear softmax head).",
                              panel=TRAIN, advanced=True)
    init: str = option("auto", "Head weight init: he, glorot, or auto (He for ReLU, Glorot "
                               "for softmax).", choices=INITS, panel=TRAIN, advanced=True)
    class_weight: str = option("auto", "balanced, none, or auto (balanced beyond 1.5:1 "
                                       "imbalance).", choices=CLASS_WEIGHTS, panel=TRAIN,
                               advanced=True)
    monitor: str = option("val_accuracy", "Validation metric for early stopping, best epoch "
                                          "and rollback (val_accuracy ties go to the lower "
                                          "val_loss).", choices=MONITORS, panel=TRAIN,
                          advanced=True)
    epoch_window: int = option(
        3, "Choose a stage's kept epoch on the monitored metric averaged over the 3 epochs "
           "centred on it (2 at the stage's ends), so that one epoch that scored high on val "
           "by chance is not kept; 1: the single best epoch.", panel=TRAIN, advanced=True)
    patience: int = option(5, "Stop a stage after this many epochs without improvement, or "
                              "2 epochs past its warm-up (at most this many) when it is not "
                              "on course to beat the model kept before it by more than noise; "
                              "skip the stages when none could (0: never stop or skip).",
                           panel=TRAIN, advanced=True)
    augment: AugmentConfig = group(AugmentConfig, panel=AUGMENT, advanced=True)
    tensorboard: bool = option(False, "Also write TensorBoard logs to RUN/tensorboard.",
                               flag="--tensorboard", panel=OUTPUT, advanced=True)
    lr_find: bool = option(False, "Run a learning-rate range test first, save lr_find.png, "
                                  "and train the head stage at its suggestion.",
                           flag="--lr-find", panel=CHECKS, advanced=True)
    cache: bool = option(True, CACHE_HELP, panel=DATA, advanced=True)
    compute: ComputeConfig = group(ComputeConfig, panel=HARDWARE, advanced=True)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    @property
    def tunes(self) -> bool:
        """Whether the recipe has a fine-tuning stage (--finetune-epochs not 0)."""
        return self.finetune_epochs != 0

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.epochs >= 0, f"--head-epochs must be 0 or more; got {self.epochs}.")
        check(self.finetune_epochs is None or self.finetune_epochs >= 0,
              f"--finetune-epochs must be 0 or more; got {self.finetune_epochs}.")
        check(self.learning_rate > 0, f"--learning-rate must be > 0; got {self.learning_rate}.")
        check(self.finetune_lr is None or self.finetune_lr > 0,
              f"--finetune-lr must be > 0; got {self.finetune_lr}.")
        check(self.unfreeze_blocks is None or self.unfreeze_blocks >= 1
              or self.finetune_epochs == 0,
              f"--unfreeze-blocks must be at least 1 when fine-tuning; got "
              f"{self.unfreeze_blocks}. Use --finetune-epochs 0 to train the head only.")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}.")
        check(self.l2 >= 0, f"--l2 must be 0 or more; got {self.l2}.")
        check(self.dense_units >= 0, f"--dense-units must be 0 or more; got {self.dense_units}.")
        check(not (self.dense_units and self.tunes and not self.epochs),
              f"--dense-units {self.dense_units} adds a hidden layer that the linear probe "
              f"cannot initialise, so it must be trained before fine-tuning: pass "
              f"--head-epochs N (e.g. --head-epochs 20).")
        check(self.init in INITS, f"--init must be one of {', '.join(INITS)}; got {self.init}.")
        check(self.class_weight in CLASS_WEIGHTS, f"--class-weight must be one of "
                                                   f"{', '.join(CLASS_WEIGHTS)}; got "
                                                   f"{self.class_weight}.")
        check(self.monitor in MONITORS, f"--monitor must be one of {', '.join(MONITORS)}; got "
                                         f"{self.monitor}.")
        check(self.label_smoothing is None or 0 <= self.label_smoothing < 0.5,
              f"--label-smoothing must be in [0, 0.5); got {self.label_smoothing}.")
        check(self.patience >= 0, f"--patience must be 0 or more; got {self.patience}.")
        # 3 keeps one checkpoint back until the next epoch settles an epoch's average; wider
        # windows would need more of them kept
        check(self.epoch_window in (1, 3), f"--epoch-window must be 1 (the single best epoch) "
                                           f"or 3 (the mean of the 3 around each); got "
                                           f"{self.epoch_window}.")
        check(self.base != AUTO_BASE or self.weights == "imagenet",
              f"--base auto ranks the bases by their ImageNet weights; got --weights "
              f"{self.weights}. Name the base that fits those weights.")
        if self.compute.strategy == "multiworker":
            alone = [name for name, given in (
                ("--lr-find", self.lr_find), ("--tensorboard", self.tensorboard),
                ("--ema", self.optimizer.ema), ("--base auto", self.base == AUTO_BASE))
                if given]
            check(not alone, f"--strategy multiworker trains the stages across workers; "
                              f"{', '.join(alone)} works on one machine only. Drop it, or "
                              f"run it on one machine first (e.g. `transferkit bases --rank` "
                              f"to choose the base).")


@dataclass(frozen=True, kw_only=True)
class CVConfig:
    """`transferkit cv`: stratified K-fold cross-validation of the finetune recipe. The
    recipe's data is DATA and its output the ensemble run directory."""

    recipe: FinetuneConfig = group()
    folds: int = option(5, "K: how many stratified folds.", panel=TRAIN)

    def __post_init__(self) -> None:
        check(self.folds >= 2, f"--folds must be at least 2; got {self.folds}.")
        check(self.recipe.compute.strategy != "multiworker",
              "cv runs its folds on one machine; --strategy multiworker is finetune's.")
        check(self.recipe.base != AUTO_BASE,
              "cv cross-validates one recipe on one base; --base auto is finetune's. Name a "
              "base, e.g. the first of `transferkit bases --rank DATA`.")


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """`transferkit audit`: label issues, near-duplicates and outliers of a data folder."""

    data: DataConfig = group(panel=DATA)
    output: Path = option(help="Folder for audit.json and report.html.", short="-o",
                          panel=OUTPUT)
    base: str = option(DEFAULT_BASE, "Pretrained convolutional base.", choices="bases",
                       panel=MODEL)
    weights: str = option("imagenet", WEIGHTS_HELP, panel=MODEL)
    # perceptual similarity from which two images are near-duplicates; measured on planted
    # resized, re-encoded and 5 %-cropped copies in five sets, which all scored 0.98 or more
    duplicate_similarity: float = option(
        0.975, "Perceptual similarity (correlation of thumbnails, aligned over small crops) "
               "from which two images count as near-duplicates.", panel=CHECKS)
    engine: EngineConfig = group(EngineConfig, panel=HARDWARE, advanced=True)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)
    cache: bool = option(True, CACHE_HELP, panel=DATA)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        check_finite(self)
        check(0 < self.duplicate_similarity <= 1,
              f"--duplicate-similarity must be in (0, 1]; got {self.duplicate_similarity}.")


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    """`transferkit select`: which images of an unlabelled pool to label next."""

    data: DataConfig = group(panel=DATA)
    pool: Path = option(help="Folder of unlabelled images (any depth of sub-folders).",
                        panel=DATA)
    n: int = option(20, "How many images to pick.", short="-n", panel=OUTPUT)
    output: Path = option(Path("picks.csv"), "CSV file of the picks, best first: path, "
                                             "score, reason, unknown.", short="-o",
                          panel=OUTPUT)
    html: bool = option(False, "Also write the picks with thumbnails and reasons as an HTML "
                               "page beside the CSV (same name, .html).", flag="--html",
                        panel=OUTPUT)
    base: str = option(DEFAULT_BASE, "Pretrained convolutional base.", choices="bases",
                       panel=MODEL)
    weights: str = option("imagenet", WEIGHTS_HELP, panel=MODEL)
    engine: EngineConfig = group(EngineConfig, panel=HARDWARE, advanced=True)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)
    cache: bool = option(True, CACHE_HELP, panel=DATA)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.n >= 1, f"-n must be at least 1; got {self.n}.")
        _check_suffix(self.output, "-o/--output", ".csv", "the picks as CSV")


@dataclass(frozen=True, kw_only=True)
class BasesConfig:
    """`transferkit bases`: the pretrained bases, one base's blocks, or a ranking on DATA."""

    name: str | None = option(None, "Show this base's blocks.", argument=True, metavar="NAME")
    rank: Path | None = option(None, "Rank the bases whose ImageNet weights are on this "
                                     "machine by the cross-validated accuracy of a linear "
                                     "probe on DATA.", metavar="DATA")
    image_size: int | None = option(None, "Square input size in pixels. Default: each base's.")
    seed: int = option(1337, "Seed for the folds.")
    engine: EngineConfig = group(EngineConfig, panel=HARDWARE, advanced=True)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        check(self.rank is not None or self.engine.engine == "local",
              "--engine ray computes the features of --rank DATA; add --rank DATA, or drop "
              "--engine.")


@dataclass(frozen=True, kw_only=True)
class DoctorConfig:
    """`transferkit doctor`: decode every file of a data folder, as training would."""

    data_dir: Path = option(help="The data folder to check (any layout transferkit reads).",
                            argument=True, metavar="DATA")
    base: str = option(DEFAULT_BASE, "Pretrained convolutional base (its smallest input).",
                       choices="bases", panel=MODEL)
    output: Path | None = option(None, "Also write the full report as JSON.", short="-o",
                                 panel=OUTPUT)
    quarantine: Path | None = option(
        None, "Move (never delete) unusable files into this folder, keeping their relative "
              "paths.", panel=OUTPUT)
    cache: bool = option(True, CACHE_HELP, panel=DATA)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        _check_suffix(self.output, "-o/--output", ".json", "the report as JSON")


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The dense classifier `extract --train-head` trains on saved features."""

    output: Path = option(help="Also train a dense classifier on the features and save it as "
                               "a run directory usable by `predict`.", flag="--train-head")
    dense_units: int = option(256, "Hidden units of the classifier (0: linear).")
    dropout: float = option(0.5, "Dropout before the classifier's softmax layer.")
    epochs: int = option(30, "Most epochs of classifier training; the best (by val_loss) is "
                             "kept.", flag="--head-epochs")
    learning_rate: float = option(1e-3, "Classifier learning rate (Adam).")
    l2: float = option(0.0, "L2 penalty on the classifier's weights (0: none).")
    init: str = option("auto", "Weight init: he, glorot, or auto (He for ReLU, Glorot for "
                               "softmax).", choices=INITS)
    patience: int = option(10, "Epochs without val_loss improvement before training stops; "
                               "the best epoch is kept.")
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.dense_units >= 0, f"--dense-units must be 0 or more; got {self.dense_units}.")
        check(self.patience >= 1, f"--patience must be at least 1; got {self.patience}.")
        check(self.l2 >= 0, f"--l2 must be 0 or more; got {self.l2}.")
        check(self.init in INITS, f"--init must be one of {', '.join(INITS)}; got {self.init}.")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}.")
        check(self.epochs >= 1, f"--head-epochs must be at least 1; got {self.epochs}.")
        check(self.learning_rate > 0, f"--learning-rate must be > 0; got {self.learning_rate}.")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """`transferkit extract`: frozen-base features to a file, optionally a head on them."""

    data: DataConfig = group(panel=DATA)
    output: Path = option(help="Feature file to write (.npz), or with --shard-rows a folder "
                               "of shards.", short="-o", panel=OUTPUT)
    shard_rows: int = option(0, "Write a folder of .npz shards of this many images each, "
                                "with an index (for millions of images). Default: one file.",
                             panel=OUTPUT, advanced=True)
    base: str = option(DEFAULT_BASE, "Pretrained convolutional base.", choices="bases",
                       panel=MODEL)
    weights: str = option("imagenet", WEIGHTS_HELP, panel=MODEL)
    blocks: int | None = option(None, "Use only the base's first N blocks (lower layers "
                                      "transfer better to data far from ImageNet). Default: "
                                      "all.", panel=MODEL)
    pooling: str = option("avg", "Global pooling of the feature maps.", choices=POOLINGS,
                          panel=MODEL)
    precision: str = option(DEFAULT_PRECISION, PRECISION_HELP, choices=PRECISIONS,
                            panel=HARDWARE)
    engine: EngineConfig = group(EngineConfig, panel=HARDWARE, advanced=True)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)
    cache: bool = option(True, CACHE_HELP, panel=DATA)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)
    head: HeadConfig | None = group(panel=TRAIN, enabled_by="output")

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.blocks is None or self.blocks >= 1,
              f"--blocks must be at least 1; got {self.blocks}.")
        check(self.pooling in POOLINGS, f"--pooling must be avg or max; got {self.pooling}.")
        check(self.shard_rows >= 0, f"--shard-rows must be 0 (one file) or a number of "
                                     f"images per shard; got {self.shard_rows}.")
        if not self.shard_rows:
            _check_suffix(self.output, "-o/--output", ".npz", "the features as NumPy's .npz "
                                                              "(or pass --shard-rows N for a "
                                                              "folder of shards)")
        _check_precision(self.precision)

    @property
    def output_kind(self) -> str:
        return "feature folder" if self.shard_rows else "feature file"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """`transferkit evaluate`: metrics of a run on labelled images."""

    run_dir: Path = option(help="Run directory to evaluate.", argument=True, metavar="RUN")
    data_dir: Path | None = option(
        None, "A labelled folder (class sub-folders named like the run's classes). Default: "
              "the run's test split when it has one, else its validation split.",
        argument=True, metavar="DATA")
    output: Path | None = option(None, "Folder for metrics.json, confusion.png and "
                                       "mistakes.png. Default: RUN/evaluation.", short="-o",
                                 panel=OUTPUT)
    top_k: int = option(3, "Also report top-k accuracy for this k.", panel=OUTPUT)
    batch_size: int = option(32, "Images per batch.", panel=DATA)
    gallery: int = option(16, "How many of the most confidently wrong images to show.",
                          panel=OUTPUT)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")
        check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        check(self.gallery >= 0, f"--gallery must be 0 or more; got {self.gallery}.")


QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """`transferkit export`: a run's model for deployment, checked against Keras."""

    run_dir: Path = option(help="Run directory written by finetune or extract --train-head.",
                           argument=True, metavar="RUN")
    output: Path = option(help="SavedModel folder, or .tflite / .onnx file, to write.",
                          short="-o", panel=OUTPUT)
    format: str = option("savedmodel", "savedmodel (a folder for TensorFlow Serving and TF.js "
                                       "converters); tflite (a file for phones and "
                                       "microcontrollers); onnx (a file for ONNX Runtime; "
                                       "needs transferkit[onnx]).",
                         choices=tuple(EXPORT_FORMATS), panel=OUTPUT)
    quantize: str = option("none", "TFLite only: float16 halves the size; dynamic stores int8 "
                                   "weights; int8 is fully integer, calibrated on the run's "
                                   "training images.", choices=QUANTIZATIONS, panel=OUTPUT)
    check_images: int = option(16, "Images run through both the export and the Keras model to "
                                   "compare their outputs.", panel=OUTPUT)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)

    def __post_init__(self) -> None:
        check_finite(self)
        check(self.format in EXPORT_FORMATS, f"--format must be one of "
                                              f"{', '.join(EXPORT_FORMATS)}; got {self.format}.")
        suffix = EXPORT_FORMATS[self.format]
        check(not suffix or self.output.suffix.lower() == suffix,
              f"--format {self.format} writes one file; name it with {suffix} (got "
              f"'{self.output}').")
        check(self.quantize in QUANTIZATIONS, f"--quantize must be one of "
                                               f"{', '.join(QUANTIZATIONS)}; got {self.quantize}.")
        check(self.quantize == "none" or self.format == "tflite",
              f"--quantize applies to --format tflite only; got --format {self.format} "
              f"--quantize {self.quantize}.")
        check(self.check_images >= 1,
              f"--check-images must be at least 1; got {self.check_images}.")

    @property
    def output_kind(self) -> str:
        return "export folder" if not EXPORT_FORMATS[self.format] else "export file"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """`transferkit serve`: a run's model answering over HTTP."""

    run_dir: Path = option(help="Run directory written by finetune (or cv, extract "
                                "--train-head).", argument=True, metavar="RUN")
    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface; put a "
                                    "reverse proxy with TLS in front).", panel=OUTPUT)
    port: int = option(8000, "Port to listen on.", panel=OUTPUT)
    max_batch: int = option(32, "Most images run through the model at once (1: no batching).",
                            panel=HARDWARE)
    max_wait_ms: float = option(5.0, "How long the first image of a batch waits for others "
                                     "to join it, in milliseconds.", panel=HARDWARE)
    max_queue: int = option(256, "Most images waiting for the model; beyond, requests get 503 "
                                 "with Retry-After.", panel=HARDWARE)
    max_body_mb: float = option(20.0, "Largest request body, in MB.", panel=DATA)
    api_key: str | None = option(None, "Key every request must carry (Authorization: Bearer "
                                       "KEY, or X-API-Key). Default: TRANSFERKIT_API_KEY, if "
                                       "set; else none.", panel=OUTPUT)
    reload: bool = option(False, "Load a newer model.keras of the run when it appears, without "
                                 "dropping requests.", flag="--reload", panel=MODEL)
    top_k: int = option(1, "How many labels to list per image.", panel=OUTPUT)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)

    def __post_init__(self) -> None:
        check_finite(self)
        check(1 <= self.port <= 65535, f"--port must be 1 to 65535; got {self.port}.")
        check(1 <= self.max_batch <= 1024, f"--max-batch must be 1 to 1024; got "
                                            f"{self.max_batch}.")
        check(0 <= self.max_wait_ms <= 1000, f"--max-wait-ms must be 0 to 1000; got "
                                              f"{self.max_wait_ms}.")
        check(self.max_queue >= 1, f"--max-queue must be at least 1; got {self.max_queue}.")
        check(0 < self.max_body_mb <= 1024, f"--max-body-mb must be in (0, 1024]; got "
                                             f"{self.max_body_mb}.")
        check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """`transferkit predict`: a run directory applied to files and folders."""

    run_dir: Path = option(help="Run directory written by finetune or extract --train-head.",
                           argument=True, metavar="RUN")
    paths: tuple[Path, ...] = option(
        help="Image files, folders (searched recursively) or quoted glob patterns such as "
             "'shots/**/*.jpg'; - reads one path per line from stdin.", argument=True,
        metavar="PATHS...")
    top_k: int = option(1, "How many labels to list per image.", panel=OUTPUT)
    batch_size: int = option(32, "Images per batch.", panel=DATA)
    output: Path | None = option(
        None, "Write predictions to a .csv, .json or .jsonl file, or to stdout with -o -. "
              "Without it: a table on a terminal, CSV when stdout is a pipe or file.",
        short="-o", panel=OUTPUT)
    format: str | None = option(None, "csv, json or jsonl. Default: from the -o file's "
                                      "suffix; csv for stdout.", choices=PREDICTION_FORMATS,
                                panel=OUTPUT)
    overwrite: bool = option(False, OVERWRITE_HELP, flag="--overwrite", panel=OUTPUT)
    tta: bool = option(False, "Test-time augmentation: average over ten views (four corner "
                              "crops and the centre crop, each also mirrored); reports how "
                              "much it changed.", flag="--tta", panel=MODEL)
    threshold: float | None = option(
        None, "Label images whose top probability is below P 'unknown' (the best guess is "
              "kept in the output file).", metavar="P", panel=MODEL)
    reject_unknown: bool = option(
        False, "Label images whose novelty score is above the run's threshold 'unknown': "
               "unlike every class it was trained on (val set the threshold so that 95 % of "
               "known images pass).", flag="--reject-unknown", panel=MODEL)
    engine: EngineConfig = group(EngineConfig, panel=HARDWARE, advanced=True)
    runtime: RuntimeConfig = group(RuntimeConfig, panel=HARDWARE, advanced=True)
    # the paths of `paths` read from a list on stdin (not an option): one that is gone by
    # now gets an error row, as a file gone from a folder would
    listed: frozenset[Path] = field(default=frozenset())

    def __post_init__(self) -> None:
        check_finite(self)
        check(len(self.paths) > 0, "Give at least one image file or folder to predict.")
        check(self.threshold is None or 0.0 < self.threshold <= 1.0,
              f"--threshold must be a probability in (0, 1]; got {self.threshold}.")
        check(self.top_k >= 1, f"--top-k must be at least 1; got {self.top_k}.")
        check(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        check(self.format is None or self.format in PREDICTION_FORMATS,
              f"--format must be one of {', '.join(PREDICTION_FORMATS)}; got {self.format}.")
        suffix = "" if self.output is None else self.output.suffix.lower().lstrip(".")
        check(self.format is not None or self.output in (None, STDOUT)
              or suffix in PREDICTION_FORMATS,
              f"--output must end in .{', .'.join(PREDICTION_FORMATS)}, or pass --format; "
              f"got '{self.output}'.")
        check(self.format is None or suffix not in PREDICTION_FORMATS or suffix == self.format,
              f"--format {self.format} would write {self.format} into '{self.output}', whose "
              f"name says {suffix}. Drop --format (the name decides), or name the file "
              f".{self.format}.")

    def output_format(self, terminal: bool) -> str | None:
        """How predictions are written: csv, json or jsonl, or None for a table (only when
        they go to a terminal)."""
        if self.format is not None:
            return self.format
        if self.output is None or self.output == STDOUT:
            return None if terminal and self.output is None else "csv"
        return self.output.suffix.lower().lstrip(".")


