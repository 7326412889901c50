"""select: which pool images to label next, its rule, and its refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import Recorder, write_class_folder
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.commands.select import choose, select
from transferkit.config import DataConfig, SelectConfig
from transferkit.errors import ArtifactError, ConfigError, DataError


def _tree(root: Path) -> list[tuple[Path, int, int]]:
    return sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def _config(data: Path, pool: Path, out: Path, **kw) -> SelectConfig:
    return SelectConfig(data=DataConfig(data_dir=data, image_size=32), pool=pool,
                        output=out / "picks.csv", base="tiny", weights="none", **kw)


def test_choose_spreads_the_picks_and_leaves_out_copies_and_junk():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:2] * 5
    labelled = np.vstack([centres[0] + rng.normal(0, .3, (6, 8)),
                          centres[1] + rng.normal(0, .3, (6, 8))])
    labels = np.repeat([0, 1], 6)
    # two groups of pool images, each sitting between the classes, one group far larger
    between = (centres[0] + centres[1]) / 2
    big = between + np.eye(8)[2] * 2 + rng.normal(0, .2, (30, 8))
    small = between + np.eye(8)[3] * 2 + rng.normal(0, .2, (5, 8))
    copy = labelled[:1] * 1.0001  # already labelled
    junk = -np.ones((1, 8)) * 5  # unlike every class
    pool = np.vstack([big, small, copy, junk])
    rows, scores, _, sizes, left_out = choose(labelled, labels, 2, pool, 2)
    assert len(rows) == 2 and list(scores) == sorted(scores, reverse=True)
    assert {r < 30 for r in rows} == {True, False}  # one from each group, not two from the big
    assert sorted(sizes) == [5, 30]
    assert left_out == {"copies": 1, "outliers": 1} and not {35, 36} & set(rows)
    twins = np.vstack([big[:1]] * 4)  # identical candidates: never two of them
    rows, *_ = choose(labelled, labels, 2, twins, 3)
    assert len(rows) == 1


def test_select_writes_the_picks_best_first_and_touches_no_input(image_folder, tmp_path):
    pool = tmp_path / "pool"
    write_class_folder(pool / "a" / "deeper", per_class=3, offset=200)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(pool / "flat.png")
    (pool / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    before = _tree(image_folder), _tree(pool)
    recorder = Recorder()
    result = select(_config(image_folder, pool, tmp_path, n=4, html=True), recorder)
    assert (_tree(image_folder), _tree(pool)) == before
    rows = list(csv.DictReader((tmp_path / "picks.csv").open()))
    assert [r["path"] for r in rows] == [str(p.path) for p in result.picks] and len(rows) == 4
    assert all(Path(r["path"]).is_file() and pool in Path(r["path"]).parents for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r["reason"] for r in rows)
    assert [p for p, _ in result.unreadable] == [pool / "broken.jpg"]
    assert any("broken.jpg" in w for w in recorder.warnings)
    assert "<img" in (tmp_path / "picks.html").read_text()


def test_select_refuses_what_cannot_work(image_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        select(_config(image_folder, tmp_path / "empty", tmp_path))
    with pytest.raises(ConfigError, match="overlap"):
        select(_config(image_folder, image_folder / "circles", tmp_path))
    with pytest.raises(ArtifactError, match="inside the pool folder"):  # so is the output
        select(_config(image_folder, image_folder.parent, tmp_path))
    with pytest.raises(ConfigError, match="-n must be at least 1"):
        _config(image_folder, tmp_path, tmp_path, n=0)
    small = tmp_path / "small"
    write_class_folder(small, per_class=1, offset=300)
    recorder = Recorder()
    result = select(_config(image_folder, small, tmp_path / "out", n=50), recorder)
    assert 1 <= len(result.picks) <= 3
    assert any("more than the pool" in w for w in recorder.warnings)


def test_select_on_the_command_line_says_what_it_wrote(image_folder, tmp_path):
    pool = tmp_path / "pool"
    write_class_folder(pool, per_class=2, offset=400)
    out = tmp_path / "picks.csv"
    args = ["select", str(image_folder), "--pool", str(pool), "-n", "2", "-o", str(out),
            "--weights", "none", "--base", "tiny", "--image-size", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and out.exists()
    again = CliRunner().invoke(app, args)  # an existing output is refused, not replaced
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_picks_unlike_every_labelled_class_are_flagged():
    from transferkit.commands.select import unlike_every_class

    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 10
    labels = np.repeat(np.arange(3), 20)
    labelled = centres[labels] + rng.normal(size=(60, 16))
    order = np.r_[np.flatnonzero(np.arange(60) % 4 != 0), np.flatnonzero(np.arange(60) % 4 == 0)]
    labelled, labels = labelled[order], labels[order]  # train (45) first, then val (15)
    on_task = centres[[0, 1, 2]] + 0.1 * rng.normal(size=(3, 16))  # typical of their class
    off_task = rng.normal(size=(2, 16)) * 10 + 40  # far from every class
    flagged = unlike_every_class(labelled, 45, labels, np.vstack([on_task, off_task]), 3)
    assert flagged.tolist() == [False, False, False, True, True]
    assert unlike_every_class(labelled[:46], 45, labels[:46], off_task, 3).tolist() == [
        False, False]  # one val image: no threshold, nothing flagged
