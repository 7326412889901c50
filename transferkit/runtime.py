"""Which engine runs the forward passes that do not train: ONNX Runtime on the CPU, else
TensorFlow.

On these CPUs ONNX Runtime runs the same graph 1.6-1.9x as fast as a TensorFlow function
(bench/README.md, issue 36: EfficientNet-Lite0 at 224 px on 2 cores, 320 against 200
images/s on in-memory batches of 32, 379 against 198 from files in chunks of 4), so every
pass that does not train (features, predict, evaluate, serve) goes through it: the Keras
model is converted once with tf2onnx and the graph cached by the model's content
(architecture, every weight, input shape, converter and opset), read at each pass, so a
model changed since never meets an old graph. Training, and the val passes inside it, stay
on TensorFlow.

TensorFlow runs instead, with one line saying why, when `--runtime tf` asks for it, a GPU is
visible (TensorFlow uses it), onnxruntime or tf2onnx is missing, the model computes in float16,
or the converter cannot take the model. A graph not yet converted is converted only for a
pass of at least PAYS_OFF images (or an open-ended one: serve, a Ray worker of a long job),
or with `--runtime onnx`: converting Lite0 takes a few seconds, which a shorter pass would not
win back.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.config import RUNTIMES
from transferkit.errors import MissingPackageError
from transferkit.files import atomic_path

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from transferkit.reporting import Reporter

OPSET = 17
REWRITES = 1  # the version of what _convert does to tf2onnx's graph: in the graph's key
# images a pass must have before a graph is converted for it: Lite0's first pass over 1,000
# images from files, converting included, ran at TensorFlow's speed (bench/README.md)
PAYS_OFF = 1000
# rows per session run: ORT's CPU convolutions keep a few images' activations in the cores'
# caches, so a batch runs as chunks of 4 (in memory, 2 cores: Lite0's features 350-400
# images/s against 332 as one batch of 32, the tuxpaint10 run's upsampled model 166-175
# against 140-150; bench/README.md, issue 36). The pipeline still decodes whole batches.
CHUNK = 4
_PACKAGES = ("onnxruntime", "tf2onnx")
_ENV_RUNTIME, _ENV_THREADS = "TRANSFERKIT_RUNTIME", "TRANSFERKIT_THREADS"  # Ray workers read these


@dataclass
class _Chosen:
    said: set[str] = field(default_factory=set)  # lines this process printed already
    failed: set[str] = field(default_factory=set)  # graph keys the converter could not take
    long_lived: bool = False  # every pass is worth converting for (a Ray worker)


_chosen = _Chosen()
MAX_SESSIONS = 4  # sessions kept open: a run's models in turn, a server's one
_sessions: collections.OrderedDict[str, Callable[[Any], Any]] = collections.OrderedDict()
_architectures: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def configure(runtime: str, threads: int | None) -> None:
    """This process's (and its Ray workers') runtime and thread count; before TensorFlow
    starts, so that `threads` bounds TensorFlow's pools too."""
    os.environ[_ENV_RUNTIME] = runtime
    if threads:
        os.environ[_ENV_THREADS] = str(threads)
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    else:
        os.environ.pop(_ENV_THREADS, None)


def worker_env() -> dict[str, str]:
    """The environment a Ray worker runs with: this process's runtime, one thread (each
    worker is given one CPU)."""
    return {_ENV_RUNTIME: requested(), _ENV_THREADS: "1"}


def live_long() -> None:
    """This process runs its model for many short passes that add up to a long one (a Ray
    worker of a job of PAYS_OFF images or more): a graph is converted whatever one pass's
    length."""
    _chosen.long_lived = True


def requested() -> str:
    value = os.environ.get(_ENV_RUNTIME, "auto")
    return value if value in RUNTIMES else "auto"


def threads() -> int:
    """The threads ONNX Runtime gets: --threads, else every core this process may use."""
    given = os.environ.get(_ENV_THREADS, "")
    return int(given) if given.isdigit() and int(given) > 0 else len(os.sched_getaffinity(0))


def _missing() -> list[str]:
    import importlib.util

    return [name for name in _PACKAGES if importlib.util.find_spec(name) is None]


def why_tensorflow() -> str | None:
    """Why TensorFlow runs this process's forward passes, or None when ONNX Runtime does.

    Raises:
        MissingPackageError: --runtime onnx without onnxruntime or tf2onnx.
    """
    choice = requested()
    if choice == "tf":
        return "--runtime tf asks for it"
    missing = _missing()
    if missing and choice == "onnx":
        raise MissingPackageError.needs("--runtime onnx", missing, "onnx")
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"
    if choice == "auto":
        from transferkit.devices import visible_gpus

        if visible_gpus():
            return "a GPU is visible, and TensorFlow runs on it"
    return None


def _say(reporter: Reporter | None, line: str) -> None:
    if reporter is not None and line not in _chosen.said:
        _chosen.said.add(line)
        reporter.info(line)


def _architecture(model: keras.Model) -> str:
    """The model's architecture as JSON, its layers' names numbered in order (Keras names a
    second build of the same model conv2d_2); once per model object, since a built model's
    layers do not change (about 40 ms for Lite0, against 40 ms for its weights)."""
    if model not in _architectures:
        numbered: dict[str, str] = {}
        for layer in model._flatten_layers(include_self=True):
            numbered.setdefault(layer.name, f"#{len(numbered)}")
        _architectures[model] = re.sub(r'"([^"\\]*)"',
                                       lambda m: f'"{numbered.get(m[1], m[1])}"',
                                       model.to_json())
    return _architectures[model]


def graph_key(model: keras.Model, input_spec: tf.TensorSpec) -> str:
    """What identifies the converted graph: the model's architecture, every weight's bytes
    (read at each pass: a model trained since its last pass gets a new key), the input's
    shape and type, the converter's version, the opset and our rewrites' version."""
    import tf2onnx

    digest = hashlib.sha256(json.dumps(
        [_architecture(model), list(input_spec.shape.as_list()), input_spec.dtype.name,
         tf2onnx.__version__, OPSET, REWRITES]).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.data)
    return digest.hexdigest()[:24]


def _graph_path(folder: Path, key: str, content: bytes) -> Path:
    return folder / f"{key}-{hashlib.sha256(content).hexdigest()[:16]}.onnx"


def cached_graph(folder: Path, key: str) -> bytes | None:
    """The cached graph of `key` whose bytes match the digest in its name; a damaged or
    truncated file is deleted (then converted again), never used."""
    for path in sorted(folder.glob(f"{key}-*.onnx")):
        try:
            content = path.read_bytes()
        except OSError:
            continue
        if _graph_path(folder, key, content) == path:
            return content
        with contextlib.suppress(OSError):
            path.unlink()
    return None


@contextlib.contextmanager
def _converting(folder: Path, key: str) -> Iterator[None]:
    """Held while one process converts `key`: a second one waits, then finds the graph."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert(model: keras.Model, input_spec: tf.TensorSpec) -> bytes:
    import tensorflow as tf
    import tf2onnx

    from transferkit.quiet import quiet_converter

    spec = tf.TensorSpec(input_spec.shape, input_spec.dtype, name="images")
    function = tf.function(lambda x: model(x, training=False), input_signature=[spec],
                           autograph=False)
    with quiet_converter():
        proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec],
                                                 opset=OPSET)
    fold_input_scaling(proto.graph)
    return proto.SerializeToString()


def fold_input_scaling(graph: Any) -> bool:
    """Fold the preprocessing's (x * scale + offset) into the first convolution's weights, in
    place; whether it did.

    ONNX Runtime fuses element-wise ops that follow a convolution, not ones before it (the
    convolution's zero padding would then pad the unscaled input), so the preprocessing
    costs two passes over every input batch: 8 % of Lite0's graph time. Folded exactly: the
    convolution's weights take the scale, its bias the offset, and its padding pads with the
    raw value that scales to zero, -offset / scale, through an explicit Pad (only where that
    value is the same for every channel; otherwise the graph is left as converted). Matches
    Mul(x, c) -> Add(., c) -> [Transpose NHWC->NCHW] -> Conv, each used once, as tf2onnx
    writes Keras's Rescaling before a convolution."""
    constants = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return any(_fold(graph, constants, users, chain)
               for chain in _scaling_chains(graph, constants, users))


def _scaling_chains(graph: Any, constants: dict[str, Any], users: dict[str, list[Any]]
                    ) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(Mul, Add, Transpose or None, Conv) chains of fold_input_scaling's shape."""
    from onnx import helper

    def only_user(name: str, op: str) -> Any:
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    for mul in [n for n in graph.node if n.op_type == "Mul" and n.input[1] in constants]:
        add = only_user(mul.output[0], "Add")
        if add is None or add.input[1] not in constants:
            continue
        transpose = only_user(add.output[0], "Transpose")
        conv = only_user((transpose or add).output[0], "Conv")
        if conv is not None and (transpose is None or list(
                helper.get_attribute_value(transpose.attribute[0])) == [0, 3, 1, 2]):
            yield mul, add, transpose, conv


def _fold(graph: Any, constants: dict[str, Any], users: dict[str, list[Any]],
          chain: tuple[Any, Any, Any, Any]) -> bool:
    """Folds one chain (see fold_input_scaling) when that is exact; whether it did."""
    from onnx import helper, numpy_helper

    mul, add, transpose, conv = chain
    scale = numpy_helper.to_array(constants[mul.input[1]]).astype(np.float64)
    offset = numpy_helper.to_array(constants[add.input[1]]).astype(np.float64)
    kernel = numpy_helper.to_array(constants[conv.input[1]]).astype(np.float64)
    channels = kernel.shape[1]
    if scale.size not in (1, channels) or offset.size not in (1, channels) or \
            len(users[conv.input[1]]) != 1 or not np.all(scale):
        return False
    scale = np.broadcast_to(scale.ravel(), (channels,))
    offset = np.broadcast_to(offset.ravel(), (channels,))
    attributes = {a.name: a for a in conv.attribute}
    pads = list(attributes["pads"].ints) if "pads" in attributes else [0] * 4
    zero = -offset / scale  # the raw value that scales to 0
    auto_pad = attributes["auto_pad"].s if "auto_pad" in attributes else b"NOTSET"
    if auto_pad not in (b"NOTSET", b"") or (any(pads) and not np.allclose(zero, zero[0])):
        return False
    bias = (kernel * offset[None, :, None, None]).sum(axis=(1, 2, 3))
    unused = [mul.input[1], add.input[1]]
    if len(conv.input) > 2:
        bias += numpy_helper.to_array(constants[conv.input[2]])
        unused.append(conv.input[2])
    constants[conv.input[1]].CopyFrom(numpy_helper.from_array(
        (kernel * scale[None, :, None, None]).astype(np.float32), conv.input[1]))
    bias_name = f"{conv.output[0]}_folded_bias"
    graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
    conv.input[2:] = [bias_name]
    (transpose or conv).input[0] = mul.input[0]
    if any(pads):
        padded = f"{conv.output[0]}_padded"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64),
                                    f"{padded}_pads"),
            numpy_helper.from_array(np.array(zero[0], np.float32), f"{padded}_value")])
        graph.node.insert(list(graph.node).index(conv), helper.make_node(
            "Pad", [conv.input[0], f"{padded}_pads", f"{padded}_value"], [padded],
            mode="constant"))
        conv.input[0] = padded
        attributes["pads"].ints[:] = [0, 0, 0, 0]
    for node in (mul, add):
        graph.node.remove(node)
    for name in unused:
        if len(users[name]) == 1:
            graph.initializer.remove(constants[name])
    return True


def graph(model: keras.Model, input_spec: tf.TensorSpec, key: str, images: int | None,
          reporter: Reporter | None) -> bytes | None:
    """The model's ONNX graph (`key`: its graph_key), from the cache or converted now (then
    cached); None when a pass of `images` is too short to convert for (--runtime onnx
    always converts), or the converter cannot take the model (said)."""
    from transferkit.cache import GRAPHS, cache_path

    if key in _chosen.failed:
        return None
    folder = cache_path(GRAPHS)
    content = cached_graph(folder, key)
    worth = (images is None or images >= PAYS_OFF or _chosen.long_lived
             or requested() == "onnx")
    if content is None and worth:
        with _converting(folder, key):
            content = cached_graph(folder, key)
            if content is None:
                try:
                    content = _convert(model, input_spec)
                except Exception as exc:  # noqa: BLE001 - any converter failure falls back
                    _chosen.failed.add(key)
                    _say(reporter, f"ONNX Runtime cannot run {model.name} (the converter "
                                   f"failed: {type(exc).__name__}: {str(exc)[:160]}); "
                                   f"TensorFlow runs it.")
                    return None
                with atomic_path(_graph_path(folder, key, content)) as tmp:
                    tmp.write_bytes(content)
    if content is None:
        _say(reporter, f"Inference runs on TensorFlow here: for fewer than {PAYS_OFF:,} images, "
                       f"converting the model for ONNX Runtime costs more than it saves.")
    return content


def onnx_step(model: keras.Model, input_spec: tf.TensorSpec, images: int | None = None,
              reporter: Reporter | None = None) -> Callable[[Any], Any] | None:
    """`model`, with its weights as they are now, in inference mode on ONNX Runtime, for a
    pass of `images` (None: open-ended): a function of a batch (an array or a tensor)
    returning numpy arrays like the model's outputs; None when TensorFlow runs it (why is
    said once per process). Sessions are kept by graph key, the last MAX_SESSIONS."""
    reason = why_tensorflow()
    if reason is None and any(getattr(layer.dtype_policy, "compute_dtype", "float32")
                              != "float32" for layer in model.layers):
        reason = "the model computes in float16"
    if reason is not None:
        _say(reporter, f"Forward passes run on TensorFlow: {reason}.")
        return None
    key = graph_key(model, input_spec)
    if key not in _sessions:
        content = graph(model, input_spec, key, images, reporter)
        if content is None:
            return None
        _sessions[key] = _session_step(content, isinstance(model.output, (list, tuple)))
        while len(_sessions) > MAX_SESSIONS:
            _sessions.popitem(last=False)
    _sessions.move_to_end(key)
    _say(reporter, f"Forward passes run on ONNX Runtime (CPU, {threads()} threads).")
    return _sessions[key]


def _session_step(content: bytes, several: bool) -> Callable[[Any], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # threads that spin while waiting take the cores the input pipeline decodes on (1,000
    # images from files: 252 images/s without spinning, 240 with)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def step(batch: Any) -> Any:
        rows = np.asarray(batch, np.float32)
        parts = [session.run(None, {name: rows[i:i + CHUNK]})
                 for i in range(0, max(len(rows), 1), CHUNK)]
        outputs = parts[0] if len(parts) == 1 else [
            np.concatenate(chunks) for chunks in zip(*parts, strict=True)]
        return outputs if several else outputs[0]

    return step
