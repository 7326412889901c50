"""The only place that reads image files: class folders -> checked, labelled file lists ->
tf.data pipelines.

A data folder holds one sub-folder per class, either directly (then a seeded validation split
is drawn) or under `train/`, `val/` and optionally `test/`. Every file is inspected once before
training: unusable files are skipped and reported, and images TensorFlow would decode wrongly
(EXIF-rotated, with alpha, CMYK, 16-bit, TIFF...) are converted once to plain RGB PNGs in a
cache, so the decoding pipeline itself stays pure TensorFlow.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from transferkit.atomic import atomic_path, cache_dir, write_text
from transferkit.errors import DataError
from transferkit.reporting import NullReporter, Reporter

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# Formats and modes tf.io.decode_image turns into the right RGB by itself.
NATIVE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
NATIVE_MODES = frozenset({"RGB", "L", "P"})
# What each image format's files are usually called, to flag content that lies about itself.
FORMAT_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe"}, "MPO": {".jpg", ".jpeg", ".jpe"}, "PNG": {".png"},
    "GIF": {".gif"}, "BMP": {".bmp"}, "WEBP": {".webp"}, "TIFF": {".tif", ".tiff"},
}
ALPHA_BACKGROUND = (255, 255, 255)
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}
_EXIF_ORIENTATION = 0x0112
_CONVERSION_VERSION = "1"  # part of the cache key of converted images
_INSPECTION_VERSION = 1  # bump when inspect_image's findings change


@dataclass(frozen=True)
class ImageInfo:
    """What one full decode of a file found."""

    path: Path
    size_bytes: int
    sha256: str
    format: str | None = None  # from the content, not the extension
    mode: str | None = None
    width: int = 0
    height: int = 0
    orientation: int = 1  # EXIF; 1 is upright
    has_alpha: bool = False
    problem: str | None = None  # why the file cannot be used
    problem_kind: str | None = None  # empty | truncated | unreadable | not_image

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def needs_conversion(self) -> bool:
        """True when TensorFlow's decoder would not give the right RGB picture."""
        return self.usable and (self.format not in NATIVE_FORMATS or self.mode not in NATIVE_MODES
                                or self.orientation != 1 or self.has_alpha)

    @property
    def extension_mismatch(self) -> bool:
        expected = FORMAT_EXTENSIONS.get(self.format or "")
        return expected is not None and self.path.suffix.lower() not in expected


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def inspect_image(path: Path) -> ImageInfo:
    """Reads and fully decodes one file; never raises for a bad file, it says why instead."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ImageInfo(path, 0, "", problem=f"cannot be read ({exc.strerror})",
                         problem_kind="unreadable")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageInfo(path, 0, digest, problem="empty file (0 bytes)", problem_kind="empty")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return ImageInfo(path, len(data), digest,
                         problem=f"not an image file (extension '{path.suffix}')",
                         problem_kind="not_image")
    found: dict = {}
    try:
        with Image.open(path) as im:
            found = {"format": im.format, "mode": im.mode, "width": im.width,
                     "height": im.height, "has_alpha": _has_alpha(im),
                     "orientation": int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)}
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reading every byte
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        message = str(exc) or type(exc).__name__
        kind = "truncated" if "truncat" in message.lower() else "unreadable"
        return ImageInfo(path, len(data), digest, **found,
                         problem=f"{'truncated' if kind == 'truncated' else 'unreadable'} "
                                 f"image ({message})", problem_kind=kind)
    return ImageInfo(path, len(data), digest, **found)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB, alpha composited on white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(im, dtype=np.float64)
        peak = pixels.max() if pixels.size else 0
        scale = 255.0 / 65535.0 if peak > 255 else (255.0 if im.mode == "F" and peak <= 1 else 1)
        im = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), mode="L")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def converted_path(info: ImageInfo) -> Path:
    """Where the plain-RGB copy of an image that needs conversion lives (made once)."""
    target = cache_dir() / "converted" / f"{info.sha256}-v{_CONVERSION_VERSION}.png"
    if not target.is_file():
        with Image.open(info.path) as im, atomic_path(target) as tmp:
            _to_rgb(im).save(tmp, format="PNG")
    return target


class InspectionCache:
    """What inspect_image found for each file, reused while the file's size and modification
    time are unchanged, so re-reading a folder decodes only new or edited files."""

    def __init__(self) -> None:
        self.path = cache_dir() / "inspected.json"
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if stored.get("version") == _INSPECTION_VERSION:
                self.entries = stored["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no cache yet, or an unreadable one: start afresh

    @staticmethod
    def _stamp(path: Path) -> list[int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, path: Path) -> ImageInfo | None:
        entry = self.entries.get(str(path.resolve()))
        stamp = self._stamp(path)
        if entry is None or stamp is None or entry["stamp"] != stamp:
            return None
        return ImageInfo(path=path, **entry["info"])

    def put(self, info: ImageInfo) -> None:
        stamp = self._stamp(info.path)
        if stamp is not None:
            fields = {k: v for k, v in dataclasses.asdict(info).items() if k != "path"}
            self.entries[str(info.path.resolve())] = {"stamp": stamp, "info": fields}
            self.changed = True

    def save(self) -> None:
        if self.changed:
            write_text(self.path, json.dumps({"version": _INSPECTION_VERSION,
                                              "files": self.entries}))


@contextmanager
def open_inspection_cache(enabled: bool = True) -> Iterator[InspectionCache | None]:
    """The inspection memo for one command (None when `enabled` is false), read once and
    written once at the end, also when the command stops on a DataError half-way."""
    cache = InspectionCache() if enabled else None
    try:
        yield cache
    finally:
        if cache is not None:
            cache.save()


def inspect_images(paths: Sequence[Path], reporter: Reporter, cache: InspectionCache | None,
                   description: str = "Checking images") -> list[ImageInfo]:
    """`inspect_image` over many files on a thread pool (PIL decodes without the GIL); files
    that `cache` knows unchanged are not decoded again."""
    known = [cache.get(p) if cache is not None else None for p in paths]
    todo = [p for p, k in zip(paths, known, strict=True) if k is None]
    reporter.start_progress(description, len(todo))
    fresh: dict[Path, ImageInfo] = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for info in pool.map(inspect_image, todo):
            fresh[info.path] = info
            if cache is not None:
                cache.put(info)
            reporter.advance()
    reporter.stop_progress()
    return [k if k is not None else fresh[p] for p, k in zip(paths, known, strict=True)]


def decode_source(info: ImageInfo) -> str:
    """The file the tf.data pipeline decodes for this image: itself, or its converted copy."""
    return str(converted_path(info) if info.needs_conversion else info.path)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """Usable image files with integer labels into `class_names`.

    `paths` are relative to `root` (the data folder); `sources` are what gets decoded;
    `hashes` are the files' content hashes (what feature caches are keyed by).
    """

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    hashes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def converted(self) -> int:
        """How many images are decoded through a converted copy."""
        return sum(src != str(self.root / p) for p, src in zip(self.paths, self.sources,
                                                                strict=True))

    def subset(self, mask: np.ndarray) -> ImageSet:
        keep = np.flatnonzero(mask)
        return ImageSet(self.root, tuple(self.paths[i] for i in keep), self.labels[keep],
                        self.class_names, tuple(self.sources[i] for i in keep),
                        tuple(self.hashes[i] for i in keep))


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def files_under(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder`, recursively, in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found += [Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f)]
    return found


def class_dirs(root: Path) -> list[Path]:
    """The class folders of a (split) folder, sorted by name."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)),
                  key=lambda p: p.name)


def check_data_root(root: Path) -> None:
    """Raises a DataError unless `root` is an existing folder."""
    if not root.exists():
        raise DataError(f"Data folder '{root}' does not exist. Pass a folder with one "
                        f"sub-folder of images per class.")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file; pass the folder that holds the class folders.")


def find_split_dirs(root: Path) -> dict[str, Path]:
    """The split folders present in `root` (`train`, `val`, `test`), if any."""
    found = {}
    for split, names in SPLIT_DIRS.items():
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is not None:
            found[split] = folder
    return found


def _scan_classes(folder: Path, data_root: Path, class_names: Sequence[str] | None,
                  reporter: Reporter, skipped: list[SkippedFile],
                  cache: InspectionCache | None) -> ImageSet:
    """Reads `folder/<class>/**` into an ImageSet with paths relative to `data_root`,
    skipping (and recording) unusable files."""
    dirs = class_dirs(folder)
    names = tuple(d.name for d in dirs) if class_names is None else tuple(class_names)
    if class_names is None and len(dirs) < 2:
        raise DataError(
            f"Found {len(dirs)} class folder{'s' if len(dirs) != 1 else ''} in '{folder}'; "
            f"need at least 2. Put each class's images in its own sub-folder, e.g. "
            f"{folder}/cats/*.jpg and {folder}/dogs/*.jpg.")
    unknown = [d.name for d in dirs if d.name not in names]
    if unknown:
        raise DataError(f"'{folder}' has class folders {unknown} that are not among the "
                        f"training classes {list(names)}. Rename or remove them.")
    files = [(f, names.index(d.name)) for d in dirs for f in files_under(d)]
    infos = inspect_images([f for f, _ in files], reporter, cache)
    kept = [(info, label) for info, (_, label) in zip(infos, files, strict=True) if info.usable]
    skipped += [SkippedFile(i.path, i.problem or "") for i in infos if not i.usable]
    for d in dirs:
        if not any(names[label] == d.name for _, label in kept):
            why = (" (every file in it is unreadable or not an image)"
                   if any(names[label] == d.name for _, label in files) else "")
            raise DataError(f"Class folder '{d}' has no usable images{why}. Add .jpg/.png "
                            f"images to it or remove the folder.")
    return ImageSet(
        root=data_root,
        paths=tuple(info.path.relative_to(data_root) for info, _ in kept),
        labels=np.array([label for _, label in kept], dtype=np.int32),
        class_names=names,
        sources=tuple(decode_source(info) for info, _ in kept),
        hashes=tuple(info.sha256 for info, _ in kept),
    )


def load_labelled_folder(root: Path, class_names: Sequence[str],
                         reporter: Reporter | None = None) -> ImageSet:
    """A folder of class sub-folders named like `class_names` (a subset of them is fine).

    Raises:
        DataError: the folder is missing or has folders that are not among `class_names`.
    """
    reporter = reporter or NullReporter()
    root = Path(root)
    check_data_root(root)
    skipped: list[SkippedFile] = []
    with open_inspection_cache() as cache:
        images = _scan_classes(root, root, class_names, reporter, skipped, cache)
    if skipped:
        reporter.warning(f"Skipped {len(skipped)} unusable file(s): "
                         + ", ".join(str(f.path) for f in skipped[:10])
                         + (" ..." if len(skipped) > 10 else ""))
    return images


def split_position(seed: int, path: Path) -> float:
    """A file's place in [0, 1) for the validation draw: a hash of its relative path and the
    seed, so it never depends on which other files exist."""
    digest = hashlib.sha256(f"{seed}:{path.as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_validation(images: ImageSet, val_split: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Each file goes to validation when its hash position is below `val_split`; adding files
    never moves existing ones. A class with no file below the threshold lends its lowest one
    to validation, and a class entirely below keeps its highest one for training (both only
    matter for classes of a handful of images)."""
    positions = np.array([split_position(seed, p) for p in images.paths])
    is_val = positions < val_split
    for label in range(len(images.class_names)):
        idx = np.flatnonzero(images.labels == label)
        if len(idx) < 2:
            continue
        if not is_val[idx].any():
            is_val[idx[np.argmin(positions[idx])]] = True
        if is_val[idx].all():
            is_val[idx[np.argmax(positions[idx])]] = False
    return images.subset(~is_val), images.subset(is_val)


def load_splits(data_dir: Path, val_split: float, seed: int, reporter: Reporter | None = None,
                use_cache: bool = True) -> DataSplits:
    """Reads a data folder into train/val(/test) splits; with `use_cache`, files inspected
    before and unchanged since are not decoded again.

    Raises:
        DataError: the folder is missing, has fewer than two classes, or a class has no
            usable images.
    """
    reporter = reporter or NullReporter()
    root = Path(data_dir)
    check_data_root(root)
    skipped: list[SkippedFile] = []
    split_dirs = find_split_dirs(root)
    with open_inspection_cache(use_cache) as cache:
        if "train" not in split_dirs:
            train, val = split_validation(
                _scan_classes(root, root, None, reporter, skipped, cache), val_split, seed)
            test = None
        else:
            full = _scan_classes(split_dirs["train"], root, None, reporter, skipped, cache)
            if "val" in split_dirs:
                train = full
                val = _scan_classes(split_dirs["val"], root, full.class_names, reporter,
                                    skipped, cache)
            else:
                train, val = split_validation(full, val_split, seed)
            test = None if "test" not in split_dirs else _scan_classes(
                split_dirs["test"], root, full.class_names, reporter, skipped, cache)
    if len(val) == 0:
        raise DataError(f"No validation images could be drawn from '{root}': every class has "
                        f"a single image. Add images, or provide a '{root}/val' folder.")
    return DataSplits(train.class_names, train, val, test, "val" in split_dirs, tuple(skipped))


def splits_from_table(root: Path, class_names: Sequence[str], rows: Sequence[dict[str, str]],
                      reporter: Reporter | None = None) -> DataSplits:
    """Rebuilds the splits a run was trained on from its saved table (path, label, split),
    so a resumed run sees the same files. Files gone since are skipped and reported."""
    reporter = reporter or NullReporter()
    check_data_root(root)
    names = tuple(class_names)
    with open_inspection_cache() as cache:
        infos = inspect_images([root / r["path"] for r in rows], reporter, cache)
    skipped = [SkippedFile(i.path, i.problem or "") for i in infos if not i.usable]

    def image_set(split: str) -> ImageSet | None:
        chosen = [(r, i) for r, i in zip(rows, infos, strict=True)
                  if r["split"] == split and i.usable]
        if not chosen:
            return None
        return ImageSet(root, tuple(Path(r["path"]) for r, _ in chosen),
                        np.array([names.index(r["label"]) for r, _ in chosen], np.int32), names,
                        tuple(decode_source(i) for _, i in chosen),
                        tuple(i.sha256 for _, i in chosen))

    train, val = image_set("train"), image_set("val")
    if train is None or val is None:
        raise DataError(f"The images this run was trained on are no longer in '{root}'.")
    return DataSplits(names, train, val, image_set("test"), skipped=tuple(skipped))


GLOB_CHARACTERS = frozenset("*?[")


def collect_images(paths: Iterable[Path]) -> tuple[list[Path], list[SkippedFile]]:
    """Image files named directly, found (recursively) under folders, or matched by glob
    patterns (`**` included), in a stable order.

    Files named directly are always kept, so a bad one gets a row with its error; files in
    folders or matched by a pattern are kept when their extension is an image extension.

    Raises:
        DataError: a path does not exist, or a pattern matches nothing.
    """
    files: list[Path] = []
    ignored: list[SkippedFile] = []

    def add_found(found: Iterable[Path]) -> None:
        for f in found:
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
            else:
                ignored.append(SkippedFile(f, f"not an image file (extension '{f.suffix}')"))

    for path in paths:
        if path.is_dir():
            add_found(files_under(path))
        elif path.is_file():
            files.append(path)
        elif GLOB_CHARACTERS & set(str(path)):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            if not matches:
                raise DataError(f"The pattern '{path}' matches no files. Check it, and quote "
                                f"it so that transferkit expands it, e.g. 'photos/**/*.jpg'.")
            for match in matches:
                add_found(files_under(match) if match.is_dir() else [match])
        else:
            raise DataError(f"'{path}' does not exist. Pass image files, folders of images, "
                            f"or glob patterns.")
    return files, ignored


def load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One encoded file -> float32 RGB in [0, 255] at `image_size` square (aspect squashed).

    Only files `inspect_image` found native reach here directly (others via their converted
    copy), so grey and palette images are all that need expanding to 3 channels. Two savings
    that keep the picture: a JPEG at least twice the size on its short side is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg scales in the DCT, instead of decoding every pixel to throw most
    away), and the resize antialiases only when it shrinks an axis more than 2x. Below that,
    bilinear sampling reads every source pixel already, and the filter is costly: reading,
    decoding and resizing a 256 px JPEG to 224 took 3.6 ms with it and 1.1 ms without, on one
    core.
    """
    import tensorflow as tf

    encoded = tf.io.read_file(path)
    image = tf.cond(tf.io.is_jpeg(encoded), lambda: _decode_jpeg_scaled(encoded, image_size),
                    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    size = [image_size, image_size]
    return tf.cond(tf.reduce_max(tf.shape(image)[:2]) > 2 * image_size,
                   lambda: tf.image.resize(image, size, antialias=True),
                   lambda: tf.image.resize(image, size))


JPEG_SCALES = (1, 2, 4, 8)  # the ratios libjpeg can decode at


def _decode_jpeg_scaled(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """The JPEG decoded at the largest ratio that keeps its short side >= image_size."""
    import tensorflow as tf

    short = tf.reduce_min(tf.io.extract_jpeg_shape(encoded)[:2])
    index = tf.add_n([tf.cast(short >= r * image_size, tf.int32) for r in JPEG_SCALES[1:]])

    def decoder(ratio: int) -> Callable[[], tf.Tensor]:
        return lambda: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)

    return tf.switch_case(index, [decoder(r) for r in JPEG_SCALES])


def _parallel_calls() -> int:
    return max(2, os.cpu_count() or 1)


def build_dataset(sources: Sequence[str], labels: np.ndarray | None, image_size: int,
                  batch_size: int, shuffle_seed: int | None = None,
                  augment: Callable[[tf.Tensor], tf.Tensor] | None = None) -> tf.data.Dataset:
    """Batched (image, label) pairs, or images alone when `labels` is None; `augment` maps
    each batch of images.

    Decoding runs in parallel ahead of the model. Parallelism is set explicitly with autotune
    off: on small CPU machines autotune can stall for seconds at the end of every pass.
    """
    import tensorflow as tf

    parallel = _parallel_calls()
    items = (list(sources),) if labels is None else (list(sources), np.asarray(labels, np.int32))
    ds = tf.data.Dataset.from_tensor_slices(items)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(sources), seed=shuffle_seed, reshuffle_each_iteration=True)
    if labels is None:
        ds = ds.map(lambda p: load_image(p, image_size), num_parallel_calls=parallel)
    else:
        ds = ds.map(lambda p, y: (load_image(p, image_size), y), num_parallel_calls=parallel)
    ds = ds.batch(batch_size)
    if augment is not None and labels is None:
        ds = ds.map(augment, num_parallel_calls=parallel)
    elif augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=parallel)
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)
