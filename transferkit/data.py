"""The only place that reads image files: class folders -> labelled file lists -> tf.data.

A data folder holds one sub-folder per class, either directly (then a stratified, seeded
validation split is drawn) or under `train/`, `val/` and optionally `test/`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from transferkit.errors import DataError
from transferkit.reporting import NullReporter, Reporter

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
# What tf.io.decode_image reads; PIL reads more, but the pipeline decodes with TensorFlow.
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"})
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """Image files with integer labels into `class_names`; paths relative to `root`."""

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def absolute_paths(self) -> list[str]:
        return [str(self.root / p) for p in self.paths]


@dataclass(frozen=True)
class DataSplits:
    """The splits of one data folder, and the files left out of them."""

    class_names: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet | None = None
    presplit: bool = False
    skipped: tuple[SkippedFile, ...] = field(default_factory=tuple)

    def items(self) -> list[tuple[str, ImageSet]]:
        named = [("train", self.train), ("val", self.val), ("test", self.test)]
        return [(name, s) for name, s in named if s is not None]


def check_image(path: Path) -> str | None:
    """Decodes the file fully; returns why it cannot be used, or None when it can."""
    try:
        with Image.open(path) as im:
            if im.format not in DECODABLE_FORMATS:
                return f"unsupported image format {im.format}"
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reading every byte
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable image ({exc})"
    return None


def check_images(paths: Sequence[Path], reporter: Reporter) -> list[str | None]:
    """`check_image` over many files on a thread pool (PIL decodes without the GIL)."""
    reporter.start_progress("Checking images", len(paths))
    results: list[str | None] = []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for result in pool.map(check_image, paths):
            results.append(result)
            reporter.advance()
    reporter.stop_progress()
    return results


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder`, recursively, in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return found


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)),
                  key=lambda p: p.name)


def _scan_classes(root: Path, data_root: Path, class_names: Sequence[str] | None,
                  reporter: Reporter, skipped: list[SkippedFile]) -> ImageSet:
    """Reads `root/<class>/**` into an ImageSet with paths relative to `data_root`, skipping
    (and recording) unusable files."""
    dirs = _class_dirs(root)
    names = tuple(d.name for d in dirs) if class_names is None else tuple(class_names)
    if class_names is None and len(dirs) < 2:
        raise DataError(
            f"Found {len(dirs)} class folder{'s' if len(dirs) != 1 else ''} in '{root}'; need "
            f"at least 2. Put each class's images in its own sub-folder, e.g. "
            f"{root}/cats/*.jpg and {root}/dogs/*.jpg.")
    unknown = [d.name for d in dirs if d.name not in names]
    if unknown:
        raise DataError(f"'{root}' has class folders {unknown} that are not among the training "
                        f"classes {list(names)}. Rename or remove them.")
    candidates: list[tuple[Path, int]] = []
    for d in dirs:
        for f in _files_under(d):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                candidates.append((f, names.index(d.name)))
            else:
                skipped.append(SkippedFile(f, f"not an image file (extension '{f.suffix}')"))
    problems = check_images([f for f, _ in candidates], reporter)
    kept = []
    for (f, label), problem in zip(candidates, problems, strict=True):
        if problem is None:
            kept.append((f, label))
        else:
            skipped.append(SkippedFile(f, problem))
    for d in dirs:
        if not any(names[label] == d.name for _, label in kept):
            raise DataError(
                f"Class folder '{d}' has no usable images. Add .jpg/.png images to it or "
                f"remove the folder.")
    return ImageSet(
        root=data_root,
        paths=tuple(f.relative_to(data_root) for f, _ in kept),
        labels=np.array([label for _, label in kept], dtype=np.int32),
        class_names=names,
    )


def _split_rank(seed: int, path: Path) -> str:
    return hashlib.sha256(f"{seed}:{path.as_posix()}".encode()).hexdigest()


def split_validation(images: ImageSet, val_split: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A stratified split: in each class, the files ranked first by a seeded hash of their
    path go to validation (round(n * val_split), at least one when the class has two)."""
    is_val = np.zeros(len(images), dtype=bool)
    for label in range(len(images.class_names)):
        idx = np.flatnonzero(images.labels == label)
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_split)))
        ranked = sorted(idx, key=lambda i: _split_rank(seed, images.paths[i]))
        is_val[ranked[:n_val]] = True

    def subset(mask: np.ndarray) -> ImageSet:
        return ImageSet(images.root, tuple(p for p, m in zip(images.paths, mask, strict=True) if m),
                        images.labels[mask], images.class_names)

    return subset(~is_val), subset(is_val)


def _find_split_dir(root: Path, split: str) -> Path | None:
    return next((root / n for n in SPLIT_DIRS[split] if (root / n).is_dir()), None)


def load_splits(data_dir: Path, val_split: float, seed: int,
                reporter: Reporter | None = None) -> DataSplits:
    """Reads a data folder into train/val(/test) splits.

    Raises:
        DataError: the folder is missing, has fewer than two classes, or a class has no
            usable images.
    """
    reporter = reporter or NullReporter()
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"Data folder '{root}' does not exist. Pass a folder with one "
                        f"sub-folder of images per class.")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file; pass the folder that holds the class folders.")
    skipped: list[SkippedFile] = []
    train_dir = _find_split_dir(root, "train")
    if train_dir is None:
        train, val = split_validation(_scan_classes(root, root, None, reporter, skipped),
                                      val_split, seed)
        test, presplit = None, False
    else:
        full = _scan_classes(train_dir, root, None, reporter, skipped)
        val_dir = _find_split_dir(root, "val")
        if val_dir is None:
            train, val = split_validation(full, val_split, seed)
        else:
            train, val = full, _scan_classes(val_dir, root, full.class_names, reporter,
                                                         skipped)
        test_dir = _find_split_dir(root, "test")
        test = None if test_dir is None else _scan_classes(test_dir, root, full.class_names,
                                                           reporter, skipped)
        presplit = val_dir is not None
    if len(val) == 0:
        raise DataError(f"No validation images could be drawn from '{root}': every class has "
                        f"a single image. Add images, or provide a '{root}/val' folder.")
    return DataSplits(train.class_names, train, val, test, presplit, tuple(skipped))


def collect_images(paths: Iterable[Path]) -> tuple[list[Path], list[SkippedFile]]:
    """Image files named directly or found (recursively) under folders, in a stable order.

    Files named directly are always kept, so a bad one gets a row with its error; files in
    folders are kept when their extension is an image extension.
    """
    files: list[Path] = []
    ignored: list[SkippedFile] = []
    for path in paths:
        if path.is_dir():
            for f in _files_under(path):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                else:
                    ignored.append(SkippedFile(f, f"not an image file (extension '{f.suffix}')"))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"'{path}' does not exist. Pass image files or folders of images.")
    return files, ignored


def load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One encoded file -> float32 RGB in [0, 255] at `image_size` square (aspect squashed).

    Grey, palette and alpha images come out as 3 channels; animations give their first frame.
    """
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size], antialias=True)


def _parallel_calls() -> int:
    return max(2, os.cpu_count() or 1)


def build_dataset(paths: Sequence[str], labels: np.ndarray | None, image_size: int,
                  batch_size: int, shuffle_seed: int | None = None,
                  augment: Callable[[tf.Tensor], tf.Tensor] | None = None) -> tf.data.Dataset:
    """Batched (image, label) pairs, or images alone when `labels` is None.

    Decoding runs in parallel ahead of the model. Parallelism is set explicitly with autotune
    off: on small CPU machines autotune can stall for seconds at the end of every pass.
    """
    import tensorflow as tf

    parallel = _parallel_calls()
    items = (list(paths),) if labels is None else (list(paths), np.asarray(labels, np.int32))
    ds = tf.data.Dataset.from_tensor_slices(items)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    if labels is None:
        ds = ds.map(lambda p: load_image(p, image_size), num_parallel_calls=parallel)
    else:
        ds = ds.map(lambda p, y: (load_image(p, image_size), y), num_parallel_calls=parallel)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=parallel)
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)
