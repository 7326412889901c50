"""Reading image folders: layouts, splits, colour modes and bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_image, write_class_folder
from PIL import Image

from transferkit.data.folders import collect_images, load_splits, split_validation
from transferkit.data.pipeline import build_dataset
from transferkit.errors import DataError


def test_unsplit_folder_gets_a_seeded_split_covering_every_class(image_folder: Path):
    splits = load_splits(image_folder, val_split=0.34, seed=1)
    assert splits.class_names == CLASSES and not splits.presplit
    for label in range(3):
        assert (splits.val.labels == label).sum() >= 1
        assert (splits.train.labels == label).sum() >= 1
    assert len(splits.train) + len(splits.val) == 18
    assert not set(splits.train.paths) & set(splits.val.paths)
    again = load_splits(image_folder, val_split=0.34, seed=1)
    assert again.val.paths == splits.val.paths
    others = [load_splits(image_folder, val_split=0.34, seed=s).val.paths for s in range(2, 6)]
    assert any(o != splits.val.paths for o in others)


def test_small_classes_keep_one_image_for_training(image_folder: Path):
    splits = load_splits(image_folder, val_split=0.99, seed=0)
    train, val = split_validation(splits.train, 0.5, 0)
    assert all((train.labels == c).sum() >= 1 for c in range(3))


def test_presplit_folder_uses_its_train_val_test(presplit_folder: Path):
    splits = load_splits(presplit_folder, val_split=0.2, seed=0)
    assert splits.presplit
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 3)
    assert all(p.parts[0] == "val" for p in splits.val.paths)  # relative to the data folder


def test_inspection_memo_is_read_and_written_once_per_load(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    import transferkit.data.inspect as data

    root = tmp_path / "split"
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        write_class_folder(root / split, per_class=count)
    reads, writes = [], []
    real_init, real_write = data.InspectionCache.__init__, data.write_text
    monkeypatch.setattr(data.InspectionCache, "__init__",
                        lambda self: reads.append(1) or real_init(self))
    monkeypatch.setattr(data, "write_text", lambda *a: writes.append(a[0]) or real_write(*a))
    load_splits(root, val_split=0.2, seed=0)  # three split folders, all new files
    assert (len(reads), len(writes)) == (1, 1)
    load_splits(root, val_split=0.2, seed=0)  # nothing new: read, but nothing to write
    assert (len(reads), len(writes)) == (2, 1)


def test_colour_modes_become_rgb(tmp_path: Path):
    base = make_image("circles", 0, size=40)
    for c in CLASSES[:2]:
        (tmp_path / c).mkdir()
    base.convert("L").save(tmp_path / "circles" / "grey.png")
    base.convert("RGBA").save(tmp_path / "circles" / "rgba.png")
    base.convert("P").save(tmp_path / "squares" / "palette.gif")
    base.convert("LA").save(tmp_path / "squares" / "grey_alpha.png")
    splits = load_splits(tmp_path, 0.5, 0)
    paths = [str(tmp_path / p) for s in (splits.train, splits.val) for p in s.paths]
    batch = next(iter(build_dataset(paths, None, 32, batch_size=4)))
    assert batch.shape == (4, 32, 32, 3) and batch.dtype.name == "float32"
    assert float(np.max(batch)) <= 255.0


def test_non_images_and_corrupt_files_are_skipped_and_recorded(tmp_path: Path):
    write_class_folder(tmp_path, per_class=3)
    (tmp_path / "circles" / "notes.txt").write_text("not an image")
    (tmp_path / "circles" / ".DS_Store").write_bytes(b"\0\0")
    data = (tmp_path / "squares" / "squares_0.jpg").read_bytes()
    (tmp_path / "squares" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "stripes" / "fake.png").write_text("text pretending to be a PNG")
    splits = load_splits(tmp_path, 0.34, 0)
    reasons = {p.path.name: r for p, r in ((s, s.reason) for s in splits.skipped)}
    assert set(reasons) == {"notes.txt", "truncated.jpg", "fake.png"}
    assert "not an image file" in reasons["notes.txt"]
    assert "truncated image" in reasons["truncated.jpg"]
    assert "unreadable image" in reasons["fake.png"]
    assert len(splits.train) + len(splits.val) == 9


def test_missing_folder_one_class_and_empty_class(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nope", 0.2, 0)
    (tmp_path / "only").mkdir()
    make_image("circles", 0).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="Found 1 class folder in .*need at least 2"):
        load_splits(tmp_path, 0.2, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Class folder '.*empty' has no usable images"):
        load_splits(tmp_path, 0.2, 0)


def test_val_folder_with_unknown_class_is_refused(presplit_folder: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(presplit_folder, root)
    (root / "val" / "triangles").mkdir()
    Image.new("RGB", (32, 32)).save(root / "val" / "triangles" / "t.png")
    with pytest.raises(DataError, match=r"class folders \['triangles'\]"):
        load_splits(root, 0.2, 0)


def test_collect_images_recurses_and_reports(tmp_path: Path):
    write_class_folder(tmp_path / "a" / "deep", per_class=1)
    (tmp_path / "a" / "readme.md").write_text("hi")
    single = tmp_path / "one.png"
    make_image("squares", 1).save(single)
    files, ignored = collect_images([tmp_path / "a", single])
    assert len(files) == 4 and files[-1] == single
    assert [f.path.name for f in ignored] == ["readme.md"]
    with pytest.raises(DataError, match="does not exist"):
        collect_images([tmp_path / "missing.jpg"])


def _decoded(path: Path, size: int = 32) -> np.ndarray:
    from transferkit.data.inspect import decode_source, inspect_image

    return np.asarray(next(iter(build_dataset([decode_source(inspect_image(path))], None, size,
                                              batch_size=1)))[0])


def _resized(image: Image.Image, size: int = 32) -> np.ndarray:
    import tensorflow as tf

    # these pictures shrink less than 2x, where load_image does not antialias
    return np.asarray(tf.image.resize(np.asarray(image.convert("RGB"), np.float32), [size, size]))


def test_every_colour_mode_and_orientation_becomes_correct_rgb(messy_folder: Path):
    from PIL import ImageOps

    circles = messy_folder / "train" / "circles"
    with Image.open(circles / "exif6.jpg") as im:
        upright = ImageOps.exif_transpose(im)
        assert upright.size == (40, 48)  # stored 48x40, displayed rotated
        np.testing.assert_allclose(_decoded(circles / "exif6.jpg"), _resized(upright), atol=1e-3)
    with Image.open(circles / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        np.testing.assert_allclose(_decoded(circles / "cmyk.jpg"), _resized(im), atol=1e-3)
    sixteen = _decoded(circles / "sixteen.png", size=40)
    expected = np.linspace(0, 65535, 1600).reshape(40, 40) * 255 / 65535
    np.testing.assert_allclose(sixteen[..., 0], expected, atol=1.5)


def test_alpha_is_composited_on_white(tmp_path: Path):
    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[:, 16:] = (255, 0, 0, 255)  # right half opaque red, left half transparent black
    Image.fromarray(pixels, "RGBA").save(tmp_path / "half.png")
    out = _decoded(tmp_path / "half.png")
    np.testing.assert_allclose(out[:, :12], 255.0, atol=1)
    np.testing.assert_allclose(out[:, 20:], np.broadcast_to([255, 0, 0], (32, 12, 3)), atol=1)


def test_messy_folder_loads_with_bad_files_skipped(messy_folder: Path):
    splits = load_splits(messy_folder, 0.2, 0)
    skipped = {f.path.name for f in splits.skipped}
    assert skipped == {"truncated.jpg", "empty.jpg", "notes.jpg", "README.txt"}
    names = {p.name for p in splits.train.paths}
    assert {"café ünïcode.jpg", "cmyk.jpg", "sixteen.png", "rgba.png", "palette.gif",
            "exif6.jpg", "png_named.jpg", "tiny.png"} <= names
    converted = {p.name for p, src in zip(splits.train.paths, splits.train.sources, strict=True)
                 if not src.endswith(p.name)}
    assert converted == {"cmyk.jpg", "sixteen.png", "rgba.png", "palette_alpha.png", "exif6.jpg"}
    assert splits.train.converted == 5
    batches = list(build_dataset(splits.train.sources, splits.train.labels, 32, batch_size=64))
    assert batches[0][0].shape[0] == len(splits.train)


def _gradient(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize(("width", "height", "size"), [(1600, 1200, 64), (1000, 300, 32),
                                                      (600, 500, 224), (4032, 3024, 224)])
def test_large_jpegs_decode_scaled_and_match_a_full_antialiased_resize(tmp_path, width, height,
                                                                      size):
    """Decoding at 1/2..1/8 scale before resizing gives what Pillow's antialiased resize of
    the whole picture gives, to within two grey levels on average (TensorFlow's own
    antialiased resize of the fully decoded picture is within one)."""
    import tensorflow as tf

    from transferkit.data.pipeline import load_image

    path = tmp_path / "big.jpg"
    Image.fromarray(_gradient(width, height)).save(path, quality=95)
    ours = load_image(tf.constant(str(path)), size).numpy()
    reference = np.asarray(Image.open(path).resize((size, size), Image.BILINEAR), np.float32)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - reference).mean() < 2.0


def test_mild_downscales_resize_without_antialiasing(tmp_path):
    import tensorflow as tf

    from transferkit.data.pipeline import load_image

    pixels = _gradient(100, 90)
    Image.fromarray(pixels).save(tmp_path / "small.png")
    ours = load_image(tf.constant(str(tmp_path / "small.png")), 64).numpy()
    np.testing.assert_allclose(ours, tf.image.resize(pixels, [64, 64]).numpy(), atol=1e-4)


def test_single_image_classes_keep_their_image_for_training(tmp_path: Path):
    """1,000 classes of one image each used to leave a fifth of them in validation only."""
    from transferkit.reporting import NullReporter

    class Warnings(NullReporter):
        def __init__(self) -> None:
            self.said: list[str] = []

        def warning(self, message: str) -> None:
            self.said.append(message)

    for i in range(60):
        folder = tmp_path / f"class{i:03d}"
        folder.mkdir()
        make_image(CLASSES[i % 3], i).save(folder / "only.png")
    for name in ("class000", "class001"):  # two classes with enough images to validate
        for j in range(5):
            make_image("circles", 100 + j).save(tmp_path / name / f"more{j}.png")
    reporter = Warnings()
    splits = load_splits(tmp_path, val_split=0.2, seed=0, reporter=reporter)
    assert set(splits.train.labels.tolist()) == set(range(60))  # every class trains
    assert set(splits.val.labels.tolist()) <= {0, 1}
    assert any("58 class(es) have no validation image" in m for m in reporter.said)


def test_each_class_lends_exactly_its_fraction_and_added_images_move_few(tmp_path: Path):
    root = write_class_folder(tmp_path / "data", per_class=30)
    for seed in range(5):
        splits = load_splits(root, val_split=0.2, seed=seed)
        assert [(splits.val.labels == c).sum() for c in range(3)] == [6, 6, 6]
    before = load_splits(root, val_split=0.2, seed=7)
    write_class_folder(root, per_class=5, offset=1000)  # 5 more images per class
    after = load_splits(root, val_split=0.2, seed=7)
    assert [(after.val.labels == c).sum() for c in range(3)] == [7, 7, 7]  # round(0.2 x 35)
    old = set(before.train.paths) | set(before.val.paths)
    moved = (set(before.val.paths) ^ set(after.val.paths)) & old
    assert len(moved) <= 15  # at the margins only: at most one per added image
    assert len(set(before.val.paths) & set(after.val.paths)) >= 12
