"""The torch-free checkpoint reader and the Keras port of EfficientNet-Lite0, 1 and 2."""

from __future__ import annotations

import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from transferkit.bases import BASES, build_base, lite_checkpoint
from transferkit.bases.efficientnet_lite import (
    LITE_VARIANTS,
    build_efficientnet_lite,
    load_state_dict,
)
from transferkit.bases.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, read_state_dict
from transferkit.errors import WeightsError

ESPRESSO = 967  # ImageNet class index


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


def write_legacy_checkpoint(path: Path, state: dict[str, tuple], storages: dict[str, np.ndarray],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes torch's legacy format by hand. `state` maps a name to (storage key, offset,
    size, stride); stand-in `torch` modules exist only while pickling, so the pickles name
    torch.FloatStorage and torch._utils._rebuild_tensor_v2 exactly as torch writes them."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    float_storage = type("FloatStorage", (), {"__module__": "torch"})

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = float_storage, _rebuild_tensor_v2
    objects = {key: _Storage(key, data) for key, data in storages.items()}

    class Tensor:
        def __init__(self, key, offset, size, stride):
            self.args = (objects[key], offset, size, stride, False, OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", float_storage, obj.key, "cpu", obj.data.size)
            return None

    with monkeypatch.context() as m, open(path, "wb") as f:
        m.setitem(sys.modules, "torch", torch)
        m.setitem(sys.modules, "torch._utils", utils)
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(OrderedDict((k, Tensor(*v)) for k, v in state.items()))
        pickle.dump(list(storages), f, protocol=2)
        for data in storages.values():
            f.write(data.size.to_bytes(8, "little"))
            f.write(data.astype("<f4").tobytes())


def test_reader_rebuilds_offsets_and_strides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shared = np.arange(20, dtype=np.float32)
    state = {
        "conv.weight": ("0", 0, (2, 3), (3, 1)),
        "conv.bias": ("0", 6, (4,), (1,)),
        "transposed": ("0", 10, (3, 2), (1, 3)),  # a non-contiguous view
        "scalar": ("1", 0, (), ()),
    }
    path = tmp_path / "small.pth"
    write_legacy_checkpoint(path, state, {"0": shared, "1": np.array([7.5], np.float32)},
                            monkeypatch)
    arrays = read_state_dict(path)
    np.testing.assert_array_equal(arrays["conv.weight"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(arrays["conv.bias"], [6, 7, 8, 9])
    np.testing.assert_array_equal(arrays["transposed"], [[10, 13], [11, 14], [12, 15]])
    assert arrays["scalar"] == 7.5 and arrays["conv.weight"].dtype == np.float32


@pytest.mark.parametrize(("tensor", "message"), [
    (("0", 4, (3,), (-2,)), "invalid shape"),  # a negative stride reads before the data
    (("0", 0, (1_000_000_000,), (0,)), "reaches past the end"),  # 1e9 elements of one value
    (("0", 0, (1_000_000_000,), (1,)), "reaches past the end"),
    (("0", 0, (-3,), (1,)), "invalid shape"),
    (("0", -5, (2,), (1,)), "starts at -5"),
    (("0", 19, (2,), (1,)), "reaches past the end"),
    (("0", 0, (2, 2), (1,)), "invalid shape"),
    (("0", 0.5, (2,), (1,)), "non-integer"),
])
def test_reader_checks_every_size_stride_and_offset(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, tensor,
                                                    message):
    path = tmp_path / "crafted.pth"
    write_legacy_checkpoint(path, {"w": tensor}, {"0": np.arange(20, dtype=np.float32)},
                            monkeypatch)
    with pytest.raises(WeightsError, match=message):
        read_state_dict(path)


def test_reader_refuses_a_storage_larger_than_the_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "short.pth"
    write_legacy_checkpoint(path, {"w": ("0", 0, (4,), (1,))},
                            {"0": np.arange(4, dtype=np.float32)}, monkeypatch)
    data = path.read_bytes()
    count = (4).to_bytes(8, "little")
    at = data.rindex(count)
    path.write_bytes(data[:at] + (10**12).to_bytes(8, "little") + data[at + 8:])
    with pytest.raises(WeightsError, match="truncated or damaged"):
        read_state_dict(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_refuses_code_and_runs_none(tmp_path: Path):
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"weight": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(WeightsError, match="Refusing to load 'posix.system'"):
        read_state_dict(path)
    assert not marker.exists()


def test_reader_rejects_other_files(tmp_path: Path):
    path = tmp_path / "not_torch.pth"
    path.write_bytes(b"PK\x03\x04 a zip file, not a legacy checkpoint")
    with pytest.raises(WeightsError, match="could not be read as a PyTorch checkpoint"):
        read_state_dict(path)


LITES = tuple(LITE_VARIANTS)


@pytest.fixture(scope="module", params=LITES)
def lite_state(request: pytest.FixtureRequest) -> tuple[str, dict[str, np.ndarray]]:
    return request.param, read_state_dict(lite_checkpoint(request.param))


def test_real_checkpoints_read_every_parameter_into_the_scaled_architecture(lite_state):
    name, state = lite_state
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked")
                 and not k.endswith(("running_mean", "running_var")))
    # published counts with the 1000-class top, BatchNorm statistics left out
    assert params == {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680,
                      "efficientnet_lite2": 6_092_072}[name]
    model = build_efficientnet_lite(LITE_VARIANTS[name], (64, 64, 3))
    load_state_dict(model, state, LITE_VARIANTS[name])  # every layer set, every shape checked
    assert model.count_params() == BASES[name].params


def test_each_port_calls_coffee_espresso(lite_state):
    skimage_data = pytest.importorskip("skimage.data")
    import tensorflow as tf

    name, state = lite_state
    variant = LITE_VARIANTS[name]
    model = build_efficientnet_lite(variant, (variant.size, variant.size, 3), include_top=True)
    load_state_dict(model, state, variant)
    image = tf.image.resize(skimage_data.coffee()[None].astype("float32"),
                            (variant.size, variant.size), antialias=True)
    probabilities = model.predict((image - 127.0) / 128.0, verbose=0)[0]
    assert int(np.argmax(probabilities)) == ESPRESSO


def test_a_checkpoint_of_another_variant_is_refused(lite_state):
    name, state = lite_state
    other = LITE_VARIANTS[LITES[(LITES.index(name) + 1) % len(LITES)]]
    with pytest.raises(WeightsError):
        load_state_dict(build_efficientnet_lite(other, (64, 64, 3)), state, other)


def test_imagenet_weights_convert_once_then_load_from_cache():
    spec = BASES["efficientnet_lite0"]
    first = spec.imagenet.path()
    stamp = first.stat().st_mtime_ns
    assert spec.imagenet.path() == first and first.stat().st_mtime_ns == stamp
    base = build_base(spec, 32, "imagenet")
    np.testing.assert_allclose(base.get_layer("stem_bn").get_weights()[2],
                               read_state_dict(lite_checkpoint("efficientnet_lite0"))["_bn0.running_mean"])
