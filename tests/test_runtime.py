"""ONNX Runtime under the forward passes that do not train (runtime.py): the same answers as
TensorFlow on every base, the graph cache, and the ways back to TensorFlow."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import Recorder


@pytest.fixture()
def onnx_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFERKIT_RUNTIME", "onnx")


@pytest.fixture()
def auto_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFERKIT_RUNTIME", "auto")


def _key(model) -> str:
    from transferkit.runtime import graph_key

    return graph_key(model, _spec(16))


@pytest.fixture(autouse=True)
def _fresh_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no runtime line said, no session open."""
    from transferkit import runtime

    monkeypatch.setattr(runtime, "_chosen", runtime._Chosen())
    monkeypatch.setattr(runtime, "_sessions", type(runtime._sessions)())


def _images(size: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _spec(size: int):
    import tensorflow as tf

    return tf.TensorSpec([None, size, size, 3], tf.float32)


@pytest.mark.parametrize("base,size", [("efficientnet_lite0", 48), ("efficientnet_lite1", 48),
                                       ("efficientnet_lite2", 48), ("vgg16", 32),
                                       ("resnet50", 32)])
def test_features_equal_tensorflows_on_every_base(base: str, size: int, onnx_runtime) -> None:
    from transferkit.features import FeatureModel
    from transferkit.runtime import onnx_step

    model = FeatureModel(base, "none", 0, size, "float32", _blocks(base)).build()
    x = _images(size)
    step = onnx_step(model, _spec(size), images=None)
    assert step is not None
    expected = np.asarray(model(x, training=False))
    got = step(x)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale, rtol=1e-4)


def _blocks(base: str) -> int:
    from transferkit.bases import get_base

    return len(get_base(base).blocks)


def test_a_whole_model_with_two_outputs_gives_the_same_probabilities(onnx_runtime) -> None:
    import keras

    from transferkit.features import FeatureModel
    from transferkit.model import build_head
    from transferkit.runtime import onnx_step

    features = FeatureModel("efficientnet_lite0", "none", 0, 40, "float32", 3).build()
    head = build_head(features.output_shape[-1], 4)
    pooled = features(features.inputs[0])
    model = keras.Model(features.inputs[0], [pooled, head(pooled)])
    x = _images(40, 6)  # more rows than runtime.CHUNK: each output is put back together
    expected = [np.asarray(o) for o in model(x, training=False)]
    got = onnx_step(model, _spec(40), images=None)(x)
    assert len(got) == 2 and len(got[0]) == 6
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-4)
    np.testing.assert_allclose(got[1].sum(axis=1), 1.0, atol=1e-5)


def _tiny_model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_the_graph_is_cached_and_a_damaged_one_is_rebuilt(onnx_runtime, monkeypatch) -> None:
    from transferkit import runtime
    from transferkit.cache import GRAPHS, cache_path

    model = _tiny_model(1)
    calls = []
    convert = runtime._convert
    monkeypatch.setattr(runtime, "_convert", lambda m, s: calls.append(1) or convert(m, s))
    first = runtime.graph(model, _spec(16), _key(model), None, None)
    assert runtime.graph(model, _spec(16), _key(model), None, None) == first and len(calls) == 1
    key = runtime.graph_key(model, _spec(16))
    (path,) = cache_path(GRAPHS).glob(f"{key}-*.onnx")
    path.write_bytes(first[: len(first) // 2])  # truncated
    again = runtime.graph(model, _spec(16), _key(model), None, None)
    assert len(calls) == 2 and len(again) == len(first)
    (rebuilt,) = cache_path(GRAPHS).glob(f"{key}-*.onnx")
    assert rebuilt.read_bytes() == again


def test_changed_weights_never_meet_an_old_graph(onnx_runtime) -> None:
    from transferkit.runtime import graph_key

    model = _tiny_model(2)
    before = graph_key(model, _spec(16))
    model.layers[-1].kernel.assign(model.layers[-1].kernel.numpy() + 1)
    assert graph_key(model, _spec(16)) != before
    assert graph_key(_tiny_model(2), _spec(16)) == before


def test_two_converting_at_once_convert_once(onnx_runtime, monkeypatch) -> None:
    import time

    from transferkit import runtime

    model = _tiny_model(3)
    calls = []
    convert = runtime._convert

    def slow(m, s):
        calls.append(1)
        time.sleep(0.5)
        return convert(m, s)

    monkeypatch.setattr(runtime, "_convert", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        runtime.graph(model, _spec(16), _key(model), None, None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1] is not None


def test_a_short_pass_does_not_convert_but_uses_a_cached_graph(auto_runtime) -> None:
    from transferkit.runtime import PAYS_OFF, graph

    model = _tiny_model(4)
    reporter = Recorder()
    assert graph(model, _spec(16), _key(model), PAYS_OFF - 1, reporter) is None
    assert [m for m in reporter.messages if f"runs on TensorFlow here: for fewer than "
            f"{PAYS_OFF:,} images" in m]
    converted = graph(model, _spec(16), _key(model), PAYS_OFF, None)
    assert graph(model, _spec(16), _key(model), 1, None) == converted


def test_a_model_the_converter_cannot_take_runs_on_tensorflow_with_one_line(
        onnx_runtime, monkeypatch) -> None:
    from transferkit import runtime
    from transferkit.inference import inference_step

    def fails(m, s):
        raise ValueError("Unsupported ops: SomeOp")

    monkeypatch.setattr(runtime, "_convert", fails)
    model = _tiny_model(5)
    reporter = Recorder()
    step = inference_step(model, _spec(16), images=None, reporter=reporter)
    x = _images(16, 2)
    np.testing.assert_allclose(np.asarray(step(x)), np.asarray(model(x)), atol=1e-6)
    assert [m for m in reporter.messages if "cannot run" in m and "SomeOp" in m
            and "TensorFlow runs it" in m] and len(reporter.messages) == 1


def test_runtime_tf_and_a_missing_package_are_said(monkeypatch) -> None:
    import importlib.util

    from transferkit import runtime
    from transferkit.errors import MissingPackageError

    monkeypatch.setenv("TRANSFERKIT_RUNTIME", "tf")
    reporter = Recorder()
    assert runtime.onnx_step(_tiny_model(6), _spec(16), None, reporter) is None
    assert reporter.messages == ["Forward passes run on TensorFlow: --runtime tf asks for it."]
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    monkeypatch.setenv("TRANSFERKIT_RUNTIME", "auto")
    assert runtime.why_tensorflow() == "onnxruntime is not installed"
    monkeypatch.setenv("TRANSFERKIT_RUNTIME", "onnx")
    with pytest.raises(MissingPackageError, match="--runtime onnx needs onnxruntime"):
        runtime.why_tensorflow()


def test_training_passes_stay_on_tensorflow(onnx_runtime) -> None:
    import tensorflow as tf

    from transferkit.inference import inference_step

    step = inference_step(_tiny_model(7), _spec(16), images=None, trains=True)
    assert isinstance(step, tf.types.experimental.PolymorphicFunction)


def test_threads_follow_the_option(monkeypatch) -> None:
    import os

    from transferkit import runtime

    monkeypatch.delenv("TRANSFERKIT_THREADS", raising=False)
    assert runtime.threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("TRANSFERKIT_THREADS", "1")
    assert runtime.threads() == 1
    assert runtime.worker_env()["TRANSFERKIT_THREADS"] == "1"


def test_runtime_options_are_checked() -> None:
    from transferkit.config import RuntimeConfig
    from transferkit.errors import ConfigError

    with pytest.raises(ConfigError, match="--runtime must be one of auto, onnx, tf; got gpu"):
        RuntimeConfig(runtime="gpu")
    with pytest.raises(ConfigError, match="--threads must be between 1 and 1024; got 0"):
        RuntimeConfig(threads=0)


def test_a_model_changed_after_a_pass_is_never_answered_by_its_old_graph(onnx_runtime) -> None:
    from transferkit.inference import inference_step

    model = _tiny_model(8)
    x = _images(16, 2)
    before = np.asarray(inference_step(model, _spec(16), images=None)(x))
    dense = model.layers[-1]
    dense.kernel.assign(np.zeros_like(dense.kernel.numpy()))  # every class 1/3 now
    after = np.asarray(inference_step(model, _spec(16), images=None)(x))
    np.testing.assert_allclose(after, np.asarray(model(x)), atol=1e-5)
    assert not np.allclose(after, before)


def test_a_long_pass_converts_a_model_a_short_pass_ran_on_tensorflow(auto_runtime) -> None:
    import tensorflow as tf

    from transferkit.inference import inference_step
    from transferkit.runtime import PAYS_OFF

    model = _tiny_model(9)
    assert isinstance(inference_step(model, _spec(16), images=3),
                      tf.types.experimental.PolymorphicFunction)
    assert not isinstance(inference_step(model, _spec(16), images=PAYS_OFF),
                          tf.types.experimental.PolymorphicFunction)


def test_runtime_onnx_converts_a_short_pass_too(onnx_runtime) -> None:
    from transferkit.runtime import graph

    model = _tiny_model(10)
    assert graph(model, _spec(16), _key(model), 1, None) is not None


@pytest.mark.parametrize("padding,scale,offset,folds", [
    # the raw value that scales to 0 is 127 in every channel: folded, a Pad of 127 added
    ("same", [1 / 128] * 3, [-127 / 128] * 3, True),
    ("valid", [1 / 127.5, 1 / 64, 1 / 32], [-0.5, 1.0, 2.0], True),  # no padding: any fold
    # padding, and a different raw zero per channel: left as converted
    ("same", [1 / 127.5, 1 / 64, 1 / 32], [-0.5, 1.0, 2.0], False),
])
def test_the_input_scaling_folds_into_the_first_convolution_exactly(padding, scale, offset,
                                                                    folds) -> None:
    import keras
    import onnx
    import onnxruntime as ort
    import tensorflow as tf

    from transferkit.runtime import _convert, fold_input_scaling

    keras.utils.set_random_seed(0)
    inputs = keras.Input((13, 13, 3))
    x = keras.layers.Rescaling(scale, offset)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding=padding, use_bias=False)(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    images = _images(13)
    content = _convert(model, tf.TensorSpec([None, 13, 13, 3], tf.float32))
    graph = onnx.load_from_string(content).graph
    assert [n.op_type for n in graph.node].count("Mul") == (0 if folds else 1)
    assert not fold_input_scaling(graph)  # done once, by _convert
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(got, np.asarray(model(images)), atol=1e-4, rtol=1e-4)
