"""The bases table: every base builds, blocks are well defined, freezing counts are right,
weights resolve from files and fail clearly."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from transferkit import bases
from transferkit.bases import BASES, build_base, get_base, resolve_image_size
from transferkit.errors import ConfigError, WeightsError
from transferkit.freezing import count_params, freeze_base, unfreeze_top_blocks
from transferkit.model import build_classifier, build_feature_extractor, build_head, cut_base


@pytest.fixture(scope="module", params=sorted(BASES))
def built(request: pytest.FixtureRequest) -> tuple[bases.BaseSpec, keras.Model]:
    spec = BASES[request.param]
    return spec, build_base(spec, spec.min_size, "none")


def _block_params(base: keras.Model, spec: bases.BaseSpec, blocks: tuple[str, ...]) -> int:
    """Independent count: weights of non-BatchNorm layers whose name starts a given block."""
    return sum(int(np.prod(w.shape)) for layer in base.layers
               if any(layer.name.startswith(f"{b}_") for b in blocks)
               and not isinstance(layer, keras.layers.BatchNormalization)
               for w in layer.weights)


def test_base_builds_with_declared_feature_width(built):
    spec, base = built
    assert base.output_shape[-1] == spec.feature_dim


def test_every_block_names_layers_in_bottom_to_top_order(built):
    spec, base = built
    first_index = {}
    for i, layer in enumerate(base.layers):
        block = spec.block_of(layer.name)
        if block is not None:
            first_index.setdefault(block, i)
    assert list(first_index) == list(spec.blocks)


def test_freeze_then_unfreeze_one_and_two_blocks(built):
    spec, base = built
    extractor = build_feature_extractor(base, spec.preprocessing)
    head = build_head(spec.feature_dim, 3)
    model = build_classifier(extractor, head)
    head_params = (spec.feature_dim + 1) * 3

    freeze_base(base)
    assert count_params(model).trainable == head_params

    for n in (1, 2):
        top = unfreeze_top_blocks(base, spec, n)
        assert top == spec.blocks[-n:]
        assert count_params(model).trainable == head_params + _block_params(base, spec, top)
        batchnorms = [layer for layer in base.layers
                      if isinstance(layer, keras.layers.BatchNormalization)]
        assert all(not layer.trainable for layer in batchnorms)


def test_unfreeze_can_train_batchnorm_when_asked():
    spec = get_base("efficientnet_lite0")
    base = build_base(spec, 32, "none")
    unfreeze_top_blocks(base, spec, 1, train_batchnorm=True)
    assert base.get_layer("head_bn").trainable


def test_unfreeze_out_of_range_is_a_config_error():
    spec = get_base("vgg16")
    base = build_base(spec, 32, "none")
    with pytest.raises(ConfigError, match="vgg16 has 5 blocks"):
        unfreeze_top_blocks(base, spec, 6)


@pytest.mark.parametrize(("name", "blocks", "channels"),
                         [("vgg16", 2, 128), ("resnet50", 1, 256), ("efficientnet_lite0", 3, 40)])
def test_cut_base_after_first_blocks(name, blocks, channels):
    spec = get_base(name)
    base = cut_base(build_base(spec, 64, "none"), spec, blocks)
    assert base.output_shape[-1] == channels


def test_unknown_base_and_small_image_size():
    with pytest.raises(ConfigError, match="Unknown base 'vgg99'.*vgg16, resnet50"):
        get_base("vgg99")
    with pytest.raises(ConfigError, match="below vgg16's minimum of 32"):
        resolve_image_size(get_base("vgg16"), 16)
    assert resolve_image_size(get_base("resnet50"), None) == 224


def test_weights_file_round_trip(tmp_path: Path):
    spec = get_base("vgg16")
    original = build_base(spec, 32, "none")
    path = tmp_path / "vgg16_notop.weights.h5"
    original.save_weights(path)
    loaded = build_base(spec, 48, str(path))  # weights do not depend on the input size
    for a, b in zip(original.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weights_file_for_another_base_is_refused(tmp_path: Path):
    path = tmp_path / "vgg.weights.h5"
    build_base(get_base("vgg16"), 32, "none").save_weights(path)
    with pytest.raises(WeightsError, match="does not fit base 'resnet50'"):
        build_base(get_base("resnet50"), 32, str(path))


def test_bad_weights_values(tmp_path: Path):
    spec = get_base("vgg16")
    with pytest.raises(WeightsError, match="not 'imagenet', 'none' or an existing file"):
        build_base(spec, 32, str(tmp_path / "missing.h5"))
    wrong = tmp_path / "weights.bin"
    wrong.write_bytes(b"x")
    with pytest.raises(WeightsError, match="not a Keras weights file"):
        build_base(spec, 32, str(wrong))


def test_offline_imagenet_download_names_the_ways_forward(monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example: None -- [Errno -3] name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        build_base(get_base("resnet50"), 32, "imagenet")
    message = str(info.value)
    assert "--weights PATH" in message and "efficientnet_lite0" in message
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
