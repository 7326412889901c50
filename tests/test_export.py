"""export: every format and quantization round-trips within tolerance of the Keras model,
carries its class names, and a mismatch writes nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from transferkit.commands.export import FORMATS, TOLERANCE, export
from transferkit.config import (
    EXPORT_FORMATS,
    DataConfig,
    ExportConfig,
    ExtractConfig,
    HeadConfig,
)
from transferkit.errors import ArtifactError, ConfigError, MissingPackageError


@pytest.fixture(scope="module")
def head_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run whose answers vary from image to image (a head trained on features of
    the first two VGG16 blocks), so that a broken export cannot hide behind flat outputs."""
    from transferkit.commands.extract import extract

    work = tmp_path_factory.mktemp("export")
    extract(ExtractConfig(data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                          output=work / "f.npz", base="vgg16", weights="none", blocks=2,
                          head=HeadConfig(output=work / "run", dense_units=16, epochs=20)))
    return work / "run"


def _fresh_images(seed: int) -> np.ndarray:
    return np.round(np.random.default_rng(seed).uniform(0, 255, (6, 32, 32, 3))).astype(
        np.float32)


@pytest.mark.parametrize(("export_format", "quantize", "name"), [
    ("savedmodel", "none", "model"), ("onnx", "none", "model.onnx"),
    ("tflite", "none", "model.tflite"), ("tflite", "float16", "model.tflite"),
    ("tflite", "dynamic", "model.tflite")])
def test_export_round_trips_within_tolerance(head_run: Path, tmp_path: Path, export_format: str,
                                             quantize: str, name: str):
    if export_format == "onnx" and importlib.util.find_spec("tf2onnx") is None:
        pytest.skip("transferkit[onnx] is not installed")
    from transferkit.runs.directory import load_run

    result = _export_and_compare(head_run, tmp_path / name, export_format, quantize)
    expected = load_run(head_run).model.predict(_fresh_images(1), verbose=0)
    assert np.ptp(expected) > 0.05  # the outputs differ between images
    if export_format == "onnx":
        import onnxruntime

        meta = onnxruntime.InferenceSession(str(result.path)).get_modelmeta()
        assert meta.custom_metadata_map["class_names"] == '["circles", "squares", "stripes"]'


def test_int8_tflite_takes_raw_pixels_and_round_trips(trained_run: Path, tmp_path: Path):
    # Lite0's ReLU6 and batch norm quantize well; the VGG head above, with random weights and
    # 14 calibration images, does not, and export rightly refuses it.
    result = _export_and_compare(trained_run, tmp_path / "m.tflite", "tflite", "int8")
    from transferkit.commands.export import tflite_interpreter

    given = tflite_interpreter(result.path.read_bytes()).get_input_details()[0]
    assert given["dtype"] == np.uint8


def _export_and_compare(run_dir: Path, output: Path, export_format: str, quantize: str):
    from transferkit.runs.directory import load_run

    result = export(ExportConfig(run_dir=run_dir, output=output, format=export_format,
                                 quantize=quantize, check_images=6))
    assert result.path.exists() and result.real_images
    assert result.max_difference <= TOLERANCE[quantize]
    run = load_run(run_dir)
    assert result.labels_path == FORMATS[export_format].labels_path(result.path)
    assert result.labels_path.read_text().split() == list(run.class_names)
    images = _fresh_images(1)  # not the images export checked itself on
    expected = run.model.predict(images, verbose=0)
    got = FORMATS[export_format].run(result.path, images)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE[quantize]
    return result


def test_a_mismatch_is_an_error_and_writes_nothing(head_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    import dataclasses

    import transferkit.commands.export as export_module

    real = export_module.FORMATS["tflite"]
    broken = dataclasses.replace(real, run=lambda *args: real.run(*args)[:, ::-1])
    monkeypatch.setitem(export_module.FORMATS, "tflite", broken)  # classes in wrong order
    with pytest.raises(ArtifactError, match="does not match the Keras model"):
        export(ExportConfig(run_dir=head_run, output=tmp_path / "m.tflite", format="tflite"))
    assert list(tmp_path.iterdir()) == []


def test_export_options_are_checked(head_run: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="--quantize applies to --format tflite only"):
        ExportConfig(run_dir=head_run, output=tmp_path / "m", format="savedmodel",
                     quantize="int8")
    with pytest.raises(ConfigError, match="name it with .onnx"):
        ExportConfig(run_dir=head_run, output=tmp_path / "m.tflite", format="onnx")
    with pytest.raises(ConfigError, match="must be one of savedmodel, tflite, onnx"):
        ExportConfig(run_dir=head_run, output=tmp_path / "m.mlmodel", format="coreml")
    assert set(FORMATS) == set(EXPORT_FORMATS)  # a row for every format the config names
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"not installed. Run: pip install .*\[onnx\]"):
        export(ExportConfig(run_dir=head_run, output=tmp_path / "m.onnx", format="onnx"))
    (tmp_path / "taken.tflite").write_bytes(b"keep me")
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="already exists"):
        export(ExportConfig(run_dir=head_run, output=tmp_path / "taken.tflite",
                            format="tflite"))
    assert (tmp_path / "taken.tflite").read_bytes() == b"keep me"
