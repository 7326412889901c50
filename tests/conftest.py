"""Shared fixtures: tiny deterministic image folders and a trained run, all written here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tinybase
from PIL import Image

from transferkit.reporting import NullReporter

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["COLUMNS"] = "200"  # Rich tables unwrapped, so tests can read whole cells

tinybase.register()  # before any test module imports the CLI, which lists the bases
# The same for a subprocess a test starts (prepend to its script).
TINY_SETUP = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"import tinybase; tinybase.register()\n")

CLASSES = ("circles", "squares", "stripes")
SIZE = 32


def make_image(kind: str, index: int, size: int = SIZE) -> Image.Image:
    """A small picture whose class is visible: a disc, a square or stripes, with noise."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circles":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    elif kind == "squares":
        mask = (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4)
    else:
        mask = (xx // 4) % 2 == 0
    colour = rng.integers(128, 256, size=3)
    pixels = np.where(mask[..., None], colour, 40) + rng.integers(0, 30, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_class_folder(root: Path, per_class: int = 6, offset: int = 0) -> Path:
    for c, kind in enumerate(CLASSES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = make_image(kind, offset + 100 * c + i)
            ext = "png" if i % 2 else "jpg"
            image.save(folder / f"{kind}_{offset + i}.{ext}")
    return root


class Recorder(NullReporter):
    """A reporter that keeps its info and warning lines, for tests that read what a run
    said."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warning(self, message: str) -> None:
        self.warnings.append(message)


@pytest.fixture(autouse=True)
def _interruptible():
    """SIGINT with Python's usual handler, whatever the test runner inherited (a background
    job starts with SIGINT ignored, and transferkit rightly leaves an ignored signal alone)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted weights and caches go to a temp folder, never the user's home."""
    os.environ["TRANSFERKIT_HOME"] = str(tmp_path_factory.mktemp("transferkit_home"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of six 32x32 images, PNG and JPEG mixed, no split folders."""
    return write_class_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def presplit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("presplit")
    write_class_folder(root / "train", per_class=4)
    write_class_folder(root / "val", per_class=2, offset=50)
    write_class_folder(root / "test", per_class=1, offset=80)
    return root


@pytest.fixture(scope="session")
def trained_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-stage finetune run (random weights, 32 px) for predict tests."""
    from transferkit.commands.finetune import finetune
    from transferkit.config import DataConfig, FinetuneConfig

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    # adapt=False here and wherever the data checks are not the subject: on random weights
    # they find the features useless and tune every block, which only slows such tests
    finetune(FinetuneConfig(adapt=False, patience=0, refit=False,
                            data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                            output=run_dir, weights="none", base="tiny", epochs=1,
                            finetune_epochs=1))
    return run_dir


def write_messy_folder(root: Path) -> Path:
    """A train/val folder holding every kind of trouble real image folders have."""
    write_class_folder(root / "train", per_class=4)
    write_class_folder(root / "val", per_class=2, offset=50)
    circles, squares = root / "train" / "circles", root / "train" / "squares"
    good = make_image("circles", 7, size=40)
    jpeg = (circles / "circles_0.jpg").read_bytes()
    (circles / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (circles / "empty.jpg").write_bytes(b"")
    (circles / "notes.jpg").write_text("a text file named like a photo")
    (circles / "README.txt").write_text("not an image")
    good.save(circles / "png_named.jpg", format="PNG")
    good.convert("CMYK").save(circles / "cmyk.jpg")
    wide = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    Image.fromarray(wide).save(circles / "sixteen.png")
    good.convert("RGBA").save(circles / "rgba.png")
    good.convert("P").save(circles / "palette.gif")
    good.convert("P").save(circles / "palette_alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image("circles", 8, size=48).crop((0, 0, 48, 40)).save(circles / "exif6.jpg", exif=exif)
    good.save(circles / "café ünïcode.jpg")
    make_image("squares", 9, size=16).save(squares / "tiny.png")
    (root / "train" / "stripes" / "looks_square.png").write_bytes(
        (squares / "squares_1.png").read_bytes())  # same image, two classes
    (root / "val" / "circles" / "leaked.png").write_bytes(
        (circles / "circles_1.png").read_bytes())  # same image, two splits
    return root


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_messy_folder(tmp_path_factory.mktemp("messy"))
