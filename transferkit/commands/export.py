"""Exports a run's model for deployment outside Python (SavedModel, TFLite, ONNX), then runs
the exported model and checks it against the Keras model before anything is kept.

Every export takes raw RGB images already resized to the run's image size, with values in
0-255 (float32, or uint8 for an int8-quantized TFLite model), and returns class
probabilities: the preprocessing lives inside. The class names travel with it.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.config import EXPORT_FORMATS, SAVEDMODEL_FILES, ExportConfig
from transferkit.data.pipeline import build_dataset
from transferkit.errors import ArtifactError, DataError, MissingPackageError
from transferkit.files import json_text, replace_path
from transferkit.quiet import quiet_native_output
from transferkit.reporting import NullReporter, Reporter
from transferkit.runs.directory import LoadedRun, check_output, load_run, load_run_splits

# Largest acceptable difference of any class probability from the Keras model's, per kind of
# export. Quantization trades exactness for size and speed: a full-integer Lite0 moved
# probabilities by up to ~0.1 on tuxpaint with every top-1 answer kept; what the check must
# catch is a broken export (wrong scaling, a lost layer), which moves them far more.
TOLERANCE = {"none": 1e-4, "float16": 5e-3, "dynamic": 0.1, "int8": 0.25}
CALIBRATION_IMAGES = 100  # int8: training images that set the activation ranges


@dataclass(frozen=True)
class ExportResult:
    path: Path
    labels_path: Path
    size_bytes: int
    checked: int  # images run through both models
    max_difference: float  # of any class probability
    top1_agreement: float
    tolerance: float
    real_images: bool  # checked on the run's images (else on random ones: its data is gone)


def _run_images(run: LoadedRun, reporter: Reporter) -> tuple[list[str], list[str]] | str:
    """Image files of the run's training and validation splits, or why they cannot be had."""
    try:
        splits = load_run_splits(run.path, run.record, reporter)
    except (DataError, ArtifactError) as exc:
        return str(exc)
    return list(splits.train.sources), list(splits.val.sources)


def _as_pixels(sources: list[str], image_size: int) -> np.ndarray:
    """Images resized for the model and rounded to whole 0-255 values, as a camera gives."""
    batches = build_dataset(sources, None, image_size, 32)
    images = np.concatenate([np.asarray(b) for b in batches])
    return np.clip(np.round(images), 0, 255).astype(np.float32)


def _pick(items: list[str], count: int, seed: int = 0) -> list[str]:
    if len(items) <= count:
        return items
    chosen = np.random.default_rng(seed).choice(len(items), count, replace=False)
    return [items[i] for i in sorted(chosen)]


# Writers share one signature; only TFLite uses the calibration images and quantization.
def _write_savedmodel(run: LoadedRun, target: Path, calibration: np.ndarray | None,
                      quantize: str) -> None:
    run.model.export(str(target), format="tf_saved_model", verbose=False)


def _write_onnx(run: LoadedRun, target: Path, calibration: np.ndarray | None,
                quantize: str) -> None:
    import onnx

    with warnings.catch_warnings():  # Keras's ONNX bridge trips over numpy's np.object notice
        warnings.simplefilter("ignore", FutureWarning)
        run.model.export(str(target), format="onnx", verbose=False)
    model = onnx.load(str(target))
    for key, value in _metadata(run).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(target))


def _write_tflite(run: LoadedRun, target: Path, calibration: np.ndarray | None,
                  quantize: str) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        run.model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            assert calibration is not None

            def representative() -> Iterator[list[np.ndarray]]:
                for image in calibration:
                    yield [image[None]]

            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8  # raw pixels in, probabilities out
        target.write_bytes(converter.convert())




def _metadata(run: LoadedRun) -> dict[str, str]:
    return {"class_names": json_text(list(run.class_names), indent=None).strip(),
            "image_size": str(run.image_size),
            "input": "RGB pixels 0-255, NHWC, resized to image_size; preprocessing included",
            "output": "class probabilities in class_names order",
            "base": run.record.base}


def tflite_interpreter(content: bytes) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806 (deprecated in TF, still shipped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Interpreter(model_content=content)


def _run_savedmodel(path: Path, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # keep it: .serve needs its variables alive
    return np.concatenate([loaded.serve(tf.constant(image[None])).numpy() for image in images])


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: image[None]})[0] for image in images])


def _run_tflite(path: Path, images: np.ndarray) -> np.ndarray:
    with quiet_native_output():  # the interpreter announces its XNNPACK delegate on stderr
        interpreter = tflite_interpreter(path.read_bytes())
        interpreter.allocate_tensors()
        given, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        rows = []
        for image in images:
            interpreter.set_tensor(given["index"], image[None].astype(given["dtype"]))
            interpreter.invoke()
            rows.append(interpreter.get_tensor(out["index"]).astype(np.float32))
    return np.concatenate(rows)


@dataclass(frozen=True, kw_only=True)
class ExportFormat:
    """One row of the export formats table."""

    name: str  # a key of config.EXPORT_FORMATS, which gives its suffix
    packages: tuple[str, ...]  # importable modules it needs beyond transferkit's own
    extra: str | None  # the transferkit[extra] that installs them
    write: Callable[[LoadedRun, Path, np.ndarray | None, str], None]  # run, target, calib, q
    run: Callable[[Path, np.ndarray], np.ndarray]  # exported model on float 0-255 images
    help: str

    @property
    def suffix(self) -> str:
        """Of the file written; "" for a folder."""
        return EXPORT_FORMATS[self.name]

    @property
    def is_folder(self) -> bool:
        return not self.suffix

    def labels_path(self, output: Path) -> Path:
        """Where the class names go: inside a folder export, beside a single file."""
        return output / "labels.txt" if self.is_folder else output.with_name(
            output.name + ".labels.txt")  # m.tflite and m.onnx side by side keep their own


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat(name="savedmodel", packages=(), extra=None,
                 write=_write_savedmodel, run=_run_savedmodel,
                 help="TensorFlow Serving, TF.js converters"),
    ExportFormat(name="tflite", packages=(), extra=None,
                 write=_write_tflite, run=_run_tflite,
                 help="phones, microcontrollers; --quantize applies"),
    ExportFormat(name="onnx", packages=("tf2onnx", "onnx", "onnxruntime"),
                 extra="onnx", write=_write_onnx, run=_run_onnx,
                 help="ONNX Runtime and most runtimes"),
)}


def get_format(name: str) -> ExportFormat:
    """The table row for `name` (ExportConfig checked the name and the output's suffix),
    checked against the installed packages.

    Raises:
        MissingPackageError: a package the format needs is not installed.
    """
    fmt = FORMATS[name]
    missing = [m for m in fmt.packages if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError.needs(f"--format {name}", missing, fmt.extra)
    return fmt


def compare(expected: np.ndarray, got: np.ndarray, tolerance: float
            ) -> tuple[float, float, bool]:
    """Largest probability difference, top-1 agreement, and whether they pass: every
    difference within `tolerance`, and the same top class wherever the Keras model's lead
    over its runner-up is wider than the tolerance allows to flip."""
    difference = float(np.abs(expected - got).max()) if len(expected) else 0.0
    agree = expected.argmax(1) == got.argmax(1)
    ranked = np.sort(expected, axis=1)
    clear_lead = ranked[:, -1] - ranked[:, -2] > 2 * tolerance
    passed = difference <= tolerance and bool(agree[clear_lead].all())
    return difference, float(agree.mean()) if len(agree) else 1.0, passed


def _check_images(config: ExportConfig, run: LoadedRun, reporter: Reporter
                  ) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Images to compare the export with Keras on, int8's calibration images, and whether
    they are the run's own (else random: its data is gone)."""
    found = _run_images(run, reporter)
    if isinstance(found, str) and config.quantize == "int8":
        raise DataError(f"int8 quantization calibrates on the run's training images, which "
                        f"cannot be read: {found} Put the data back, or use --quantize "
                        f"dynamic or float16.")
    if isinstance(found, str):
        reporter.warning(f"Checking the export on random images: the run's own cannot be "
                         f"read ({found})")
        size = run.image_size
        images = np.random.default_rng(0).uniform(0, 255, (config.check_images, size, size, 3))
        return np.round(images).astype(np.float32), None, False
    train, val = found
    calibration = (_as_pixels(_pick(train, CALIBRATION_IMAGES), run.image_size)
                   if config.quantize == "int8" else None)
    return _as_pixels(_pick(val or train, config.check_images), run.image_size), calibration, True


def export(config: ExportConfig, reporter: Reporter | None = None) -> ExportResult:
    """Exports the run in `config.run_dir` and checks the export against the Keras model.

    Args:
        config: the run, the format, the target and the quantization.
        reporter: where progress goes (none when None).

    Returns:
        Where the export was written, its size, and how closely it matched Keras.

    Raises:
        TransferkitError: the run cannot be read, a package the format needs is missing,
            int8 has no calibration images, the output exists, or the export's outputs do
            not match the Keras model's (then nothing is written).
    """
    reporter = reporter or NullReporter()
    fmt = get_format(config.format)
    labels = fmt.labels_path(config.output)
    check_output(config.output, config.overwrite, what=config.output_kind,
                 writes=SAVEDMODEL_FILES)
    if not fmt.is_folder:
        check_output(labels, config.overwrite, what="labels file")
    run = load_run(config.run_dir)
    check_images, calibration, real = _check_images(config, run, reporter)
    reporter.info(f"Exporting to {config.format}"
                  + (f" ({config.quantize} quantization)" if config.quantize != "none" else "")
                  + " ...")
    expected = run.model.predict(check_images, verbose=0)
    tolerance = TOLERANCE[config.quantize]
    config.output.parent.mkdir(parents=True, exist_ok=True)  # as every command's output
    with tempfile.TemporaryDirectory(dir=config.output.parent) as tmp:
        built = Path(tmp) / config.output.name
        fmt.write(run, built, calibration, config.quantize)
        difference, agreement, passed = compare(expected, fmt.run(built, check_images),
                                                tolerance)
        if not passed:
            raise ArtifactError(
                f"The exported {config.format} model does not match the Keras model on "
                f"{len(check_images)} images: largest probability difference {difference:.4g} "
                f"(tolerance {tolerance:g}), top-1 agreement {agreement:.0%}. Nothing was "
                f"written. Try another --quantize, or report this as a bug.")
        staged_labels = built / labels.name if fmt.is_folder else Path(tmp, labels.name)
        # a name's own bytes, one a line, as a folder listing holds them
        staged_labels.write_bytes(b"".join(os.fsencode(n) + b"\n" for n in run.class_names))
        if fmt.is_folder:
            (built / "transferkit.json").write_text(json_text(_metadata(run)), encoding="utf-8")
        replace_path(built, config.output)
        if not fmt.is_folder:
            replace_path(staged_labels, labels)
    size = (sum(f.stat().st_size for f in config.output.rglob("*") if f.is_file())
            if config.output.is_dir() else config.output.stat().st_size)
    return ExportResult(config.output, labels, size, len(check_images), difference, agreement,
                        tolerance, real)
