"""Precision policies and distribution strategies (on CPU: logical devices stand in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import CLASSES, TINY_SETUP

from transferkit.bases import get_base
from transferkit.devices import build_strategy, precision_policy, resolve_precision
from transferkit.errors import ConfigError
from transferkit.model import build_classifier, build_feature_extractor, build_head


def test_mixed_precision_keeps_the_softmax_in_float32():
    spec = get_base("efficientnet_lite0")
    with precision_policy("mixed") as resolved:
        assert resolved == "mixed"
        extractor = build_feature_extractor(spec.build((32, 32, 3)), spec.preprocessing)
        model = build_classifier(extractor, build_head(spec.feature_dim, 3, dense_units=8))
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    base = model.get_layer("features").get_layer("efficientnet_lite0")
    assert base.get_layer("stem_conv").compute_dtype == "float16"
    assert model.get_layer("head").get_layer("predictions").compute_dtype == "float32"
    out = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert out.dtype == np.float32 and np.allclose(out.sum(axis=1), 1, atol=1e-3)


def test_auto_precision_is_float32_without_a_gpu():
    assert resolve_precision("auto") == "float32"
    assert resolve_precision("mixed") == "mixed"


def test_multiworker_checks_tf_config_before_making_the_strategy(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')  # no task
    with pytest.raises(ConfigError, match="TF_CONFIG does not describe this worker"):
        build_strategy("multiworker")
    assert build_strategy("none").num_replicas_in_sync == 1


MIRRORED = TINY_SETUP + """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from pathlib import Path
from transferkit.config import AugmentConfig, ComputeConfig, DataConfig, FinetuneConfig
from transferkit.commands.finetune import finetune
for name, augment in (("run", True), ("features", False)):  # the head on images, on features
    finetune(FinetuneConfig(adapt=False, patience=0, augment=AugmentConfig(enabled=augment),
                            data=DataConfig(data_dir=Path(sys.argv[1]), image_size=32,
                                            batch_size=4),
                            output=Path(sys.argv[2]) / name, weights="none", base="tiny",
                            epochs=1, finetune_epochs=1,
                            compute=ComputeConfig(strategy="mirrored")))
"""


def test_mirrored_strategy_trains_on_two_logical_cpus(image_folder: Path, tmp_path: Path):
    """15 training and 3 val images on 2 replicas: batches that do not split evenly, which
    Keras's own evaluate cannot take under tf.distribute."""
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(image_folder), str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["compute"]["strategy"] == "MirroredStrategy"
    assert info["compute"]["replicas"] == 2
    assert info["data"]["counts"]["val"] == dict.fromkeys(CLASSES, 1)
    for name in ("run", "features"):
        history = json.loads((tmp_path / name / "history.json").read_text())
        assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)
        assert all(r["val_accuracy"] * 3 == pytest.approx(round(r["val_accuracy"] * 3))
                   for r in history)
