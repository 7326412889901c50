"""Class folders and splits: which files are the images of which class, in which split.

A data folder holds one sub-folder per class, either directly (then a seeded validation split
is drawn) or under `train/`, `val/` and optionally `test/`.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.data.inspect import (
    IMAGE_EXTENSIONS,
    InspectionCache,
    decode_source,
    inspect_images,
    open_inspection_cache,
)
from transferkit.errors import ConfigError, DataError
from transferkit.reporting import NullReporter, Reporter, fits_one_line

SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


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

    def join(self, other: ImageSet) -> ImageSet:
        """This set followed by `other` (of the same folder and classes)."""
        return ImageSet(self.root, self.paths + other.paths,
                        np.concatenate([self.labels, other.labels]), self.class_names,
                        self.sources + other.sources, self.hashes + other.hashes)


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

    def every_image(self) -> ImageSet:
        """Train, val and test (when there is one) as one set, in that order."""
        sets = [s for _, s in self.items()]
        joined = sets[0]
        for more in sets[1:]:
            joined = joined.join(more)
        return joined

    def rows(self) -> list[tuple[str, str, str]]:
        """splits.csv rows: relative path (posix), class name, split."""
        return [(p.as_posix(), s.class_names[label], name) for name, s in self.items()
                for p, label in zip(s.paths, s.labels, strict=True)]


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
    """The class folders of a (split) folder, sorted by name.

    Raises:
        DataError: a folder name holds a line break or another control character, which no
            labels file, CSV row or terminal line can carry intact.
    """
    found = sorted((p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)),
                   key=lambda p: p.name)
    for folder in found:
        if not fits_one_line(folder.name):
            raise DataError(f"The class folder name {folder.name!r} in '{root}' holds a line "
                            f"break or another control character, which a labels file cannot "
                            f"carry. Rename the folder.")
    return found


def check_data_root(root: Path) -> None:
    """Raises a DataError unless `root` is an existing folder."""
    if not root.exists():
        raise DataError(f"Data folder '{root}' does not exist. Pass a folder with one "
                        f"sub-folder of images per class.")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file; pass the folder that holds the class folders.")


def check_data_folder(root: Path) -> None:
    """The checks that need no image decoded: `root` is a folder with at least two class
    folders (under `train/` when it has one). Cheap, so commands run it first.

    Raises:
        DataError: saying what is missing and how the folder should look.
    """
    check_data_root(root)
    folder = find_split_dirs(root).get("train", root)
    dirs = class_dirs(folder)
    if len(dirs) < 2:
        raise DataError(
            f"Found {len(dirs)} class folder{'s' if len(dirs) != 1 else ''} in '{folder}'; "
            f"need at least 2. Put each class's images in its own sub-folder, e.g. "
            f"{folder}/cats/*.jpg and {folder}/dogs/*.jpg.")


def find_split_dirs(root: Path) -> dict[str, Path]:
    """The split folders present in `root` (`train`, `val`, `test`), if any."""
    found = {}
    for split, names in SPLIT_DIRS.items():
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is not None:
            found[split] = folder
    return found


def stray_images(root: Path, split_dirs: dict[str, Path]) -> list[Path]:
    """Images lying beside the class folders, which training cannot label (notes and
    scripts there are fine)."""
    return sorted(f for folder in {root, *split_dirs.values()} for f in folder.iterdir()
                  if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _scan_classes(folder: Path, data_root: Path, class_names: Sequence[str] | None,
                  reporter: Reporter, skipped: list[SkippedFile],
                  cache: InspectionCache | None) -> ImageSet:
    """Reads `folder/<class>/**` into an ImageSet with paths relative to `data_root`,
    skipping (and recording) unusable files."""
    dirs = class_dirs(folder)
    names = tuple(d.name for d in dirs) if class_names is None else tuple(class_names)
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
    digest = hashlib.sha256(f"{seed}:{path.as_posix()}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_validation(images: ImageSet, val_split: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Each class lends exactly round(`val_split` x its size) images to validation: those
    whose hash positions are lowest. A position never depends on which other files exist, so
    adding images moves an existing one only at the margin of its class (an added image that
    ranks below it, or a quota grown by one), never anywhere else. A class of two or more
    images lends at least one and keeps at least one for training; a class of a single image
    keeps it for training."""
    positions = np.array([split_position(seed, p) for p in images.paths])
    is_val = np.zeros(len(images), bool)
    for label in range(len(images.class_names)):
        idx = np.flatnonzero(images.labels == label)
        if len(idx) < 2:
            continue
        quota = min(max(int(np.floor(val_split * len(idx) + 0.5)), 1), len(idx) - 1)
        is_val[idx[np.argsort(positions[idx], kind="stable")[:quota]]] = True
    return images.subset(~is_val), images.subset(is_val)


def _warn_unvalidated(splits: DataSplits, reporter: Reporter) -> None:
    """Names the classes the validation split has no image of: their accuracy is unmeasured."""
    seen = set(splits.val.labels.tolist())
    missing = [name for i, name in enumerate(splits.class_names) if i not in seen]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if
                                           len(missing) > 10 else "")
        why = ("The val/ folder has no usable image of them: add some under val/CLASS/ to "
               "validate them." if splits.presplit else
               "A class of a single image keeps it for training; add images (or a val/ "
               "folder) to validate them.")
        reporter.warning(f"{len(missing)} class(es) have no validation image, so their "
                         f"accuracy is not measured: {shown}. {why}")


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
    check_data_folder(root)
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
    splits = DataSplits(train.class_names, train, val, test, "val" in split_dirs,
                        tuple(skipped))
    stray = stray_images(root, split_dirs)
    if stray:
        reporter.warning(f"Ignored {len(stray)} image(s) outside any class folder, which name "
                         f"no class: " + ", ".join(str(f) for f in stray[:10])
                         + (" ..." if len(stray) > 10 else "") + ". Move each into its class's "
                         "folder to train on it.")
    _warn_unvalidated(splits, reporter)
    return splits


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
    if val is None and train is not None and not any(r["split"] == "val" for r in rows):
        val = train.subset(np.zeros(len(train), bool))  # a cv ensemble: no split of its own
    if train is None or val is None:
        raise DataError(f"The images this run was trained on are no longer in '{root}'.")
    return DataSplits(names, train, val, image_set("test"), skipped=tuple(skipped))


GLOB_CHARACTERS = frozenset("*?[")


def collect_images(paths: Iterable[Path], listed: Collection[Path] = ()
                   ) -> tuple[list[Path], list[SkippedFile]]:
    """Image files named directly, found (recursively) under folders, or matched by glob
    patterns (`**` included), in a stable order.

    Files named directly are always kept, so a bad one gets a row with its error, as a bad
    file in a folder does: a broken or looping link, a FIFO. Files in folders or matched by
    a pattern are kept when their extension is an image extension. A path of a `listed`
    one (read from a list, e.g. `find ... |`) that does not exist gets a row too.

    Raises:
        DataError: a path given (not listed) does not exist, or a pattern matches nothing.
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
        elif path.is_file() or os.path.lexists(path) or path in listed:
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


@dataclass(frozen=True)
class Pool:
    """An unlabelled folder's readable images that the labelled data does not hold already
    (labels all 0: unknown), the files that could not be read, with why, and how many files
    repeated a labelled image's content or an earlier pool file's."""

    images: ImageSet
    unreadable: tuple[tuple[Path, str], ...]
    labelled_copies: int


def read_pool(pool: Path, data_dir: Path, labelled: ImageSet, reporter: Reporter) -> Pool:
    """The images of `pool`, any depth of sub-folders, for select and finetune --unlabeled.

    Raises:
        DataError: `pool` is not a folder, or holds no readable image that is not labelled.
        ConfigError: `pool` and `data_dir` overlap.
    """
    if not pool.is_dir():
        raise DataError(f"The pool '{pool}' is not a folder. Pass the folder of unlabelled "
                        f"images (sub-folders are searched too).")
    inside, data = pool.resolve(), data_dir.resolve()
    if inside == data or data in inside.parents or inside in data.parents:
        raise ConfigError(f"The pool '{pool}' and the data folder '{data_dir}' overlap: images "
                          f"would be both labelled and unlabelled. Pass a pool folder outside "
                          f"the data folder, and the data folder outside it.")
    files, _ = collect_images([pool])
    with open_inspection_cache() as cache:
        infos = inspect_images(files, reporter, cache)
    unreadable = tuple((i.path, i.problem or "") for i in infos if not i.usable)
    if unreadable:
        reporter.warning(f"Skipped {len(unreadable)} unreadable file(s) in the pool, e.g. "
                         f"{unreadable[0][0]}: {unreadable[0][1]}.")
    seen = set(labelled.hashes)
    readable, copies = [], 0
    for info in infos:
        if info.usable and info.sha256 in seen:
            copies += 1
        elif info.usable:
            readable.append(info)
            seen.add(info.sha256)
    if not readable and not copies:
        raise DataError(f"The pool '{pool}' holds no readable images (found {len(files)} image "
                        f"file(s)). Pass a folder of .jpg/.png images.")
    if not readable:
        raise DataError(f"Every image of the pool '{pool}' is already in the labelled data "
                        f"({copies} file(s) with the same content): it adds nothing to learn "
                        f"from or to pick. Pass a folder of images that are not labelled yet.")
    images = ImageSet(pool, tuple(i.path.relative_to(pool) for i in readable),
                      np.zeros(len(readable), np.int64), labelled.class_names,
                      tuple(decode_source(i) for i in readable),
                      tuple(i.sha256 for i in readable))
    return Pool(images, unreadable, copies)
