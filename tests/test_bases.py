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
from transferkit.model import build_classifier, build_feature_extractor, build_head, cut_base
from transferkit.training.freezing import count_params, freeze_base, unfreeze_top_blocks


@pytest.fixture(scope="module", params=sorted(BASES))
def built(request: pytest.FixtureRequest) -> tuple[bases.BaseSpec, keras.Model]:
    spec = BASES[request.param]
    return spec, build_base(spec, spec.min_size, "none")


def _params_above(base: keras.Model, cut: keras.Model | None) -> int:
    """Independent count: weights of non-BatchNorm layers of `base` that are not in `cut`."""
    below = set() if cut is None else {layer.name for layer in cut.layers}
    return sum(int(np.prod(w.shape)) for layer in base.layers
               if layer.name not in below
               and not isinstance(layer, keras.layers.BatchNormalization)
               for w in layer.weights)


def test_base_builds_with_declared_width_and_parameter_count(built):
    spec, base = built
    assert base.output_shape[-1] == spec.feature_dim
    assert base.count_params() == spec.params


def test_blocks_split_the_layers_at_points_every_path_crosses(built):
    spec, base = built
    spans = list(spec.block_spans(base).values())
    assert [s.start for s in spans[1:]] == [s.stop for s in spans[:-1]]
    assert spans[0].start == 0 and spans[-1].stop == len(base.layers)
    assert all(len(s) > 0 for s in spans)
    for n in range(1, len(spec.blocks) + 1):  # so the first n blocks are a model of their own
        cut = cut_base(base, spec, n)
        assert [layer.name for layer in cut.layers] == \
            [layer.name for layer in base.layers[:spans[n - 1].stop]]


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
        kept = len(spec.blocks) - n
        cut = cut_base(base, spec, kept) if kept else None
        assert count_params(model).trainable == head_params + _params_above(base, cut)
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
    with pytest.raises(ConfigError, match="Unknown base 'vgg99'. Did you mean vgg19"):
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


def test_offline_imagenet_download_names_the_ways_forward(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path):
    from keras.src.utils import file_utils  # what keras.applications download with

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example: None -- [Errno -3] name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "get_file", offline)
    spec = get_base("resnet50")
    assert not spec.imagenet.available()
    with pytest.raises(WeightsError) as info:
        build_base(spec, 32, "imagenet")
    message = str(info.value)
    assert "--weights PATH" in message and "efficientnet_lite0" in message
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message


def test_imagenet_weights_in_the_keras_cache_are_used_offline(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path):
    spec = get_base("vgg19")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir()
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(cached, "w") as f:  # the legacy format of Keras's downloads
        save_weights_to_hdf5_group(f, build_base(spec, 32, "none"))
    assert spec.imagenet.available()
    assert bases.resolve_weights(spec, "imagenet") == cached
    build_base(spec, 32, "imagenet")  # loads without any download


def test_efficientnet_input_scaling_matches_keras_imagenet_build():
    """Our preprocessing + the base's own Normalization (holding what the ImageNet file
    holds) = (x / 255 - mean) / std, as Keras's weights="imagenet" build computes."""
    spec = get_base("efficientnetb0")
    base = build_base(spec, 32, "none")
    norm = next(layer for layer in base.layers
                if isinstance(layer, keras.layers.Normalization))
    mean, std = np.array(bases.IMAGENET_MEAN), np.array(bases.IMAGENET_STD)
    norm.set_weights([mean, std, np.array(0)])  # the file stores std as the "variance"
    norm.finalize_state()  # as loading a weights file does
    stem = keras.Model(base.inputs, norm.output)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    p = spec.preprocessing
    scaled = (x - np.array(p.mean)) / np.array(p.std)
    np.testing.assert_allclose(stem.predict(scaled, verbose=0), (x / 255 - mean) / std,
                               rtol=1e-4, atol=1e-4)
