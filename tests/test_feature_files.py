"""Feature files: one .npz or a folder of shards with an index, read by one reader; a stopped
sharded extract keeps its finished shards; a hostile index is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli import invoke

from transferkit.commands.extract import extract
from transferkit.config import DataConfig, ExtractConfig
from transferkit.errors import ArtifactError
from transferkit.feature_files import iter_features, load_features
from transferkit.features import FeatureExtractor


def _config(data: Path, out: Path, **kwargs) -> ExtractConfig:
    return ExtractConfig(data=DataConfig(data_dir=data, image_size=32, batch_size=8),
                         output=out, base="vgg16", weights="none", blocks=2, overwrite=True,
                         cache=False, **kwargs)


@pytest.fixture(scope="module")
def single_and_sharded(image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    where = tmp_path_factory.mktemp("shards")
    extract(_config(image_folder, where / "one.npz"))
    result = extract(_config(image_folder, where / "sharded", shard_rows=5))
    return where / "one.npz", where / "sharded", result


def test_shards_hold_the_same_rows_as_one_file(single_and_sharded):
    one, sharded, result = single_and_sharded
    assert result.shards == 4 and result.counts["train"] + result.counts["val"] == 18
    assert sorted(p.name for p in sharded.iterdir()) == [
        "index.json", "part-00000.npz", "part-00001.npz", "part-00002.npz", "part-00003.npz"]
    assert [len(part.labels) for part in iter_features(sharded)] == [5, 5, 5, 3]
    a, b = load_features(one), load_features(sharded)
    np.testing.assert_allclose(a.features, b.features, atol=1e-6)
    for name in ("labels", "splits", "paths"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.class_names == b.class_names and b.meta["blocks"] == 2
    assert not sharded.with_name("sharded.partial").exists()


def test_a_stopped_sharded_extract_keeps_its_finished_shards(image_folder: Path,
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    calls = []
    original = FeatureExtractor.features

    def stop_at_the_third(self, sets, label):
        calls.append(label)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, sets, label)

    out = tmp_path / "features"
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractor, "features", stop_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            extract(_config(image_folder, out, shard_rows=5))
    assert not out.exists() and len(list((tmp_path / "features.partial").glob("*.npz"))) == 2
    resumed = extract(_config(image_folder, out, shard_rows=5))
    assert resumed.computed == 8  # the last 5 + 3 images; the first 10 were kept
    assert len(load_features(out).labels) == 18


@pytest.mark.parametrize("damage", ["escape", "count", "swap", "format"])
def test_a_hostile_or_damaged_index_is_refused(single_and_sharded, tmp_path: Path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(single_and_sharded[1], folder)
    index = json.loads((folder / "index.json").read_text())
    if damage == "escape":
        index["shards"][0]["file"] = "../one.npz"
    elif damage == "count":
        index["rows"] += 1
    elif damage == "swap":
        (folder / "part-00001.npz").replace(folder / "part-00000.npz")
    else:
        index["format"] = "something-else"
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError):
        load_features(folder)


def test_cli_writes_shards_and_refuses_an_existing_folder(image_folder: Path, tmp_path: Path):
    out = tmp_path / "feats"
    args = ("extract", image_folder, "-o", out, "--base", "vgg16", "--blocks", "1",
            "--weights", "none", "--image-size", "32", "--shard-rows", "7")
    done = invoke(*args)
    assert done.exit_code == 0, done.output
    assert "3 shards" in done.stdout and (out / "index.json").is_file()
    again = invoke(*args)
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    bad = invoke(*args[:-1], "-3")
    assert bad.exit_code == 2 and "--shard-rows" in bad.stderr
