"""--engine ray: extract and predict on a local Ray cluster (2 CPUs) give what the local
run gives (a sharded output included), a repeated run sends nothing the cache holds, and the
rows come back in order, each exactly once."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.errors import ClusterError
from transferkit.feature_files import load_features
from transferkit.raybatch import _in_order
from transferkit.reporting import NullReporter

ray = pytest.importorskip("ray")
runner = CliRunner()


def said(text: str) -> str:
    return " ".join(text.split())

# Lite0, since a Ray worker builds the base from transferkit's own table (the tests' tiny
# base is registered in this process only)
LITE0 = ["--base", "efficientnet_lite0", "--weights", "none", "--image-size", "32"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_extract_on_ray_equals_the_local_run_and_reuses_the_cache(cluster, image_folder,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path / "home"))  # an empty cache
    local = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "local.npz"),
                                *LITE0, "--no-cache"])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "ray"),
                                 *LITE0, "--engine", "ray", "--shard-rows", "10"])
    assert remote.exit_code == 0, remote.output
    assert "on Ray: 10 images" in said(remote.output)  # a Ray job per shard
    assert "on Ray: 8 images" in said(remote.output)
    a, b = load_features(tmp_path / "local.npz"), load_features(tmp_path / "ray")
    assert (a.paths == b.paths).all() and (a.splits == b.splits).all()
    assert np.abs(a.features - b.features).max() < 1e-5
    again = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "again.npz"),
                                *LITE0, "--engine", "ray"])
    assert again.exit_code == 0, again.output
    assert "0 computed, 18 reused" in said(again.output)
    assert "on Ray" not in again.output  # nothing was sent


def test_predict_on_ray_equals_the_local_run(cluster, trained_run, image_folder, tmp_path):
    rows = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.csv"
        done = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "-o",
                                   str(out), "--engine", engine])
        assert done.exit_code == 0, done.output
        rows[engine] = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows["local"]] == [r["path"] for r in rows["ray"]]
    assert [r["label"] for r in rows["local"]] == [r["label"] for r in rows["ray"]]
    for field in ("probability", "novelty"):
        assert max(abs(float(a[field]) - float(b[field]))
                   for a, b in zip(rows["local"], rows["ray"], strict=True)) < 1e-5


def test_base_features_on_ray_equal_the_local_ones_and_bases_rank_sends_them(
        cluster, image_folder, tmp_path, monkeypatch):
    """What audit, select and `bases --rank` compare images by, computed on Ray."""
    from transferkit.commands import bases as ranking
    from transferkit.config import DataConfig, EngineConfig
    from transferkit.data.folders import load_splits
    from transferkit.features import base_features

    data = DataConfig(data_dir=image_folder, image_size=32)
    images = load_splits(image_folder, data.val_split, data.seed).every_image()
    local, remote = (base_features("efficientnet_lite0", "none", data, images, NullReporter(),
                                   use_cache=False, engine=EngineConfig(engine=engine))
                     for engine in ("local", "ray"))
    assert np.abs(local - remote).max() < 1e-5
    engines = []
    monkeypatch.setattr(ranking, "available_bases", lambda: ["efficientnet_lite0"])
    monkeypatch.setattr(ranking, "base_features", lambda *args: engines.append(args[-1]) or
                        remote[:len(args[3])])
    ranked = runner.invoke(app, ["bases", "--rank", str(image_folder), "--engine", "ray"])
    assert ranked.exit_code == 0, ranked.output
    assert [e.engine for e in engines] == ["ray"]


def test_a_worker_that_dies_mid_task_is_replaced_and_no_row_is_lost_or_doubled(cluster,
                                                                                tmp_path):
    """The first actor to take a task kills its own process (as kill -9 would) before it
    answers; Ray restarts it and runs the task again."""
    from transferkit.config import EngineConfig
    from transferkit.raybatch import ROWS_PER_TASK, run_on_ray

    marker = tmp_path / "died"

    class DiesOnce:
        batch_size = 8

        def build(self):
            return None

        def run(self, model, sources):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return np.array([[float(Path(s).stem)] for s in sources])

    sources = [str(tmp_path / f"{i}.png") for i in range(3 * ROWS_PER_TASK + 5)]
    rows = run_on_ray(DiesOnce(), sources, EngineConfig(engine="ray"), NullReporter(), "test")
    assert marker.exists()  # a worker did die
    assert rows.ravel().tolist() == list(range(len(sources)))


def test_rows_come_back_in_order_and_each_once():
    parts = [{"index": np.array([2, 0]), "output0": np.array([[2.0], [0.0]])},
             {"index": np.array([1]), "output0": np.array([[1.0]])}]
    assert _in_order(parts, 3).ravel().tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ClusterError, match="returned 4 rows for 3 images"):
        _in_order([*parts, parts[1]], 3)


def test_ray_options_are_checked(image_folder, tmp_path, monkeypatch):
    given = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "f.npz"),
                                "--ray-address", "head:6379"])
    assert given.exit_code == 2 and "is for --engine ray" in said(given.output)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    missing = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "f.npz"),
                                  *LITE0, "--no-cache", "--engine", "ray"])
    assert missing.exit_code == 1 and "[ray]\"" in said(missing.output)
    assert "-e \"" in said(missing.output)  # installed from a clone: the hint says so


def test_help_names_the_extra_to_install():
    shown = runner.invoke(app, ["extract", "--help-all"], env={"COLUMNS": "200"})
    assert "Needs transferkit[ray]." in said(shown.output)  # not eaten as Rich markup
