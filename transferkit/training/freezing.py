"""Which weights train: the frozen base, whole blocks unfrozen from the top, BatchNorm kept
frozen (its statistics and scale stay pretrained unless asked), and the counts to show."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from transferkit.bases import BaseSpec


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    non_trainable: int


def count_params(model: keras.Model) -> ParamCounts:
    """Trainable and frozen parameter counts, as the optimizer will see them."""

    def total(weights: list) -> int:
        return int(sum(np.prod(w.shape) for w in weights))

    return ParamCounts(total(model.trainable_weights), total(model.non_trainable_weights))


def freeze_base(base: keras.Model) -> None:
    """Freezes every layer of the base (recompile the model afterwards)."""
    base.trainable = False


def unfreeze_top_blocks(base: keras.Model, spec: BaseSpec, blocks: int,
                        train_batchnorm: bool = False) -> tuple[str, ...]:
    """Makes the top `blocks` blocks trainable, all else frozen; returns their names.

    BatchNormalization layers stay frozen unless `train_batchnorm`: with small data, updating
    them wrecks the pretrained statistics the rest of the block relies on.
    """
    spec.check_block_count(blocks, "--unfreeze-blocks")
    top = spec.blocks[-blocks:]
    spans = spec.block_spans(base)
    first_trainable = spans[top[0]].start
    base.trainable = True
    for i, layer in enumerate(base.layers):
        in_top = i >= first_trainable
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = in_top and (train_batchnorm or not is_bn)
    return top
