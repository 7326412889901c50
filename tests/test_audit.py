"""audit on a planted folder: flipped labels, resized / re-encoded / cropped copies of val
images in train, and an image unlike any class; audit.json's fields and report.html's
structure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli.app import app

KINDS = ("discs", "squares", "rings")


def shape(kind: str, seed: int, size: int = 64) -> Image.Image:
    """A shape at a random place and size, in a colour of its kind, over noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(9, 16)
    if kind == "discs":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    elif kind == "squares":
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    else:
        mask = abs(np.hypot(yy - cy, xx - cx) - r) < 3
    colour = rng.integers(0, 90, size=3)  # each kind has its own dominant channel, so that
    colour[KINDS.index(kind)] = rng.integers(170, 256)  # even a random base separates them
    # a smooth background of its own (a random 4x4 field, upsampled), so that two images of
    # one kind differ as two photos of one thing do
    field = np.asarray(Image.fromarray(rng.integers(0, 120, (4, 4), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC), dtype=np.int64)
    pixels = np.where(mask[..., None], colour, field[..., None]) + rng.integers(
        0, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    for c, kind in enumerate(KINDS):
        for split, count in (("train", 16), ("val", 5)):
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                shape(kind, 1000 * c + 100 * (split == "val") + i).save(folder / f"{i}.png")
    flipped = []
    for kind, other in zip(KINDS, KINDS[1:] + KINDS[:1], strict=True):
        target = root / "train" / other / f"flipped_{kind}.png"
        (root / "train" / kind / "0.png").rename(target)
        flipped.append(target.relative_to(root).as_posix())
    copies = []
    for k, kind in enumerate(KINDS):
        original = root / "val" / kind / "1.png"
        with Image.open(original) as image:
            if k == 2:
                image = image.crop((3, 3, 64, 64))  # 5 % off two sides
            copy = root / "train" / kind / f"copy_{kind}.jpg"
            image.resize((45, 45)).convert("RGB").save(copy, "JPEG", quality=60)
        copies.append(sorted([original.relative_to(root).as_posix(),
                              copy.relative_to(root).as_posix()]))
    odd = np.zeros((64, 64, 3), np.uint8)
    odd[:, :, :] = np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None]  # grey, no shape
    Image.fromarray(odd).save(root / "train" / "discs" / "odd.png")
    return root, {"flipped": flipped, "copies": copies, "outlier": "train/discs/odd.png"}


@pytest.fixture(scope="module")
def audited(planted: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = planted
    out = tmp_path_factory.mktemp("audit") / "out"
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    result = CliRunner().invoke(app, ["audit", str(root), "-o", str(out), "--weights", "none",
                                      "--base", "vgg16",  # random VGG features are not flat
                                      "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # untouched
    return out


def test_flipped_labels_rank_first(planted, audited):
    _, truth = planted
    found = json.loads((audited / "audit.json").read_text())
    ranking = [r["path"] for r in found["label_quality"]]
    assert len(ranking) == 3 * (16 + 5) + 3 + 1  # the copies and the odd one are images too
    top = ranking[:len(truth["flipped"])]
    assert len(set(top) & set(truth["flipped"])) >= 2
    issue = next(i for i in found["label_issues"] if i["path"] == truth["flipped"][0])
    assert (issue["given"], issue["suggested"], issue["split"]) == ("squares", "discs", "train")
    scores = [i["score"] for i in found["label_issues"]]
    assert scores == sorted(scores)


def test_every_planted_copy_is_found_across_splits(planted, audited):
    _, truth = planted
    found = json.loads((audited / "audit.json").read_text())
    pairs = {tuple(sorted(p["paths"])): p for p in found["near_duplicates"]}
    for copy in truth["copies"]:
        pair = pairs[tuple(copy)]
        assert pair["cross_split"] and not pair["cross_class"]
        assert pair["similarity"] >= found["thresholds"]["duplicate_similarity"]
    assert set(pairs) == {tuple(c) for c in truth["copies"]}  # distinct images are not


def test_an_image_unlike_any_class_is_an_outlier(planted, audited):
    _, truth = planted
    found = json.loads((audited / "audit.json").read_text())
    assert found["outliers"][0]["path"] == truth["outlier"]  # the farthest first


def test_report_is_one_self_contained_page(audited):
    page = (audited / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for heading in ("Summary", "Likely label errors", "Near-duplicates", "Outliers",
                    "Embedding map"):
        assert f"<h2>{heading}</h2>" in page
    assert "data:image/jpeg;base64," in page and "<svg" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from a network
    assert len(re.findall(r"<circle ", page)) >= 67


def test_a_name_with_markup_is_escaped(tmp_path):
    from transferkit.reports import html as report

    cell = report.esc("<script>alert(1)</script>")
    assert "<script>" not in cell and "&lt;script&gt;" in cell


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_a_real_browser(audited, tmp_path):
    """Headless Chromium draws the page offline: the thumbnails and the map's coloured
    points show up in the screenshot."""
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1200,4000", f"--screenshot={shot}",
                    (audited / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80  # colour, not grey text
    assert saturated.mean() > 0.002  # thumbnails of coloured shapes and the map's points
    rows = np.flatnonzero(saturated.any(axis=1))
    assert rows.max() - rows.min() > 1000  # colour from the top sections down to the map
