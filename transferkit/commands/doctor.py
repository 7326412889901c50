"""`doctor`: one pass that fully decodes every file of a data folder and reports what would
trouble training, and moves (never deletes) unusable files aside on request."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.data.folders import (
    check_data_root,
    class_dirs,
    files_under,
    find_split_dirs,
    stray_images,
)
from transferkit.data.inspect import (
    ImageInfo,
    inspect_images,
    open_inspection_cache,
)
from transferkit.errors import ArtifactError, ConfigError
from transferkit.files import atomic_path, check_writable
from transferkit.reporting import NullReporter, Reporter

# Kinds of finding, in the order they are shown, with what each means.
KINDS = {
    "few_classes": "fewer than two class folders",
    "empty_class": "class folder without usable images",
    "missing_class": "class absent from a split",
    "empty": "empty file (0 bytes)",
    "truncated": "truncated image",
    "unreadable": "file that does not decode as an image",
    "not_image": "non-image file among the images",
    "special": "not a regular file (FIFO, device or socket)",
    "too_large": "image above the size limit (256 MiB, 64 megapixels)",
    "stray_image": "image outside any class folder (ignored by training)",
    "extension_mismatch": "content does not match the file extension",
    "too_small": "image smaller than the base's minimum size",
    "leak": "same image in two splits (validation leakage)",
    "conflict": "same image in two classes (contradictory labels)",
    "duplicate": "same image twice in one class",
}
# What --quarantine moves. A special file (a FIFO, a link to a device) is moved as itself,
# never read: renamed, or across disks made again there (_move).
UNUSABLE = ("empty", "truncated", "unreadable", "not_image", "special", "too_large")


@dataclass(frozen=True)
class Finding:
    kind: str
    detail: str
    paths: tuple[Path, ...] = ()  # relative to the data folder


@dataclass(frozen=True)
class ClassStats:
    split: str  # "all" when the folder has no split folders
    name: str
    images: int  # usable
    unusable: int
    modes: dict[str, int] = field(default_factory=dict)  # colour modes of usable images


@dataclass(frozen=True)
class DoctorReport:
    root: Path
    classes: tuple[ClassStats, ...]
    findings: tuple[Finding, ...]
    files: int
    min_size: int

    @property
    def clean(self) -> bool:
        return not self.findings

    def imbalance(self) -> dict[str, float | None]:
        """Largest over smallest class, per split (None when a class is empty)."""
        by_split: dict[str, list[int]] = defaultdict(list)
        for c in self.classes:
            by_split[c.split].append(c.images)
        return {s: (max(n) / min(n) if n and min(n) else None) for s, n in by_split.items()}

    def unusable_files(self) -> list[Path]:
        return [p for f in self.findings if f.kind in UNUSABLE for p in f.paths]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "files": self.files, "min_size": self.min_size,
            "clean": self.clean, "imbalance": self.imbalance(),
            "classes": [{"split": c.split, "class": c.name, "images": c.images,
                         "unusable": c.unusable, "modes": c.modes} for c in self.classes],
            "findings": [{"kind": f.kind, "detail": f.detail,
                          "paths": [p.as_posix() for p in f.paths]} for f in self.findings],
        }


def _file_findings(info: ImageInfo, rel: Path, min_size: int) -> list[Finding]:
    if not info.usable:
        return [Finding(info.problem_kind or "unreadable", info.problem or "", (rel,))]
    found = []
    if info.extension_mismatch:
        found.append(Finding("extension_mismatch",
                             f"{info.format} content named '{rel.suffix}'", (rel,)))
    if min(info.width, info.height) < min_size:
        found.append(Finding("too_small", f"{info.width}x{info.height} is below {min_size} px",
                             (rel,)))
    return found


def _duplicate_findings(entries: list[tuple[str, str, Path, ImageInfo]]) -> list[Finding]:
    groups: dict[str, list[tuple[str, str, Path]]] = defaultdict(list)
    for split, name, rel, info in entries:
        if info.usable:
            groups[info.sha256].append((split, name, rel))
    found = []
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = tuple(rel for _, _, rel in members)
        splits = sorted({s for s, _, _ in members})
        classes = sorted({c for _, c, _ in members})
        if len(splits) > 1:
            found.append(Finding("leak", f"identical files in splits {', '.join(splits)}", paths))
        if len(classes) > 1:
            found.append(Finding("conflict", f"identical files in classes {', '.join(classes)}",
                                 paths))
        if len(splits) == 1 and len(classes) == 1:
            found.append(Finding("duplicate", f"{len(members)} identical files", paths))
    return found


def diagnose(data_dir: Path, min_size: int, reporter: Reporter | None = None,
             use_cache: bool = True) -> DoctorReport:
    """Inspects every file under `data_dir` as training would see it (with `use_cache`, files
    unchanged since an earlier inspection are not decoded again).

    Raises:
        DataError: `data_dir` is missing or not a folder (everything else is a finding).
    """
    reporter = reporter or NullReporter()
    root = Path(data_dir)
    check_data_root(root)
    split_dirs = find_split_dirs(root) or {"all": root}
    findings: list[Finding] = []
    layout: list[tuple[str, str, Path]] = []  # split, class, file
    for split, folder in split_dirs.items():
        for d in class_dirs(folder):
            layout += [(split, d.name, f) for f in files_under(d)]
    with open_inspection_cache(use_cache) as cache:
        infos = inspect_images([f for _, _, f in layout], reporter, cache, "Inspecting images")
    entries = [(s, c, f.relative_to(root), i) for (s, c, f), i in zip(layout, infos, strict=True)]

    stats: dict[tuple[str, str], Counter] = {}
    unusable: Counter = Counter()
    for split, folder in split_dirs.items():
        for d in class_dirs(folder):
            stats[(split, d.name)] = Counter()
    for split, name, rel, info in entries:
        findings += _file_findings(info, rel, min_size)
        if info.usable:
            stats[(split, name)][info.mode or "?"] += 1
        else:
            unusable[(split, name)] += 1
    findings += _duplicate_findings(entries)
    findings += [Finding("stray_image", "not inside a class folder", (f.relative_to(root),))
                 for f in stray_images(root, split_dirs)]

    classes = tuple(ClassStats(s, c, sum(m.values()), unusable[(s, c)], dict(sorted(m.items())))
                    for (s, c), m in stats.items())
    names_by_split: dict[str, set[str]] = defaultdict(set)
    for c in classes:
        names_by_split[c.split].add(c.name)
        if c.images == 0:
            findings.append(Finding("empty_class", f"class '{c.name}' in {c.split} has "
                                                   f"{c.unusable} unusable and no usable files"))
    all_names = set().union(*names_by_split.values()) if names_by_split else set()
    for split, names in names_by_split.items():
        for missing in sorted(all_names - names):
            findings.append(Finding("missing_class", f"class '{missing}' has no folder in "
                                                     f"{split}"))
    if len(names_by_split.get("train", names_by_split.get("all", set()))) < 2:
        findings.append(Finding("few_classes", "training needs at least two class folders"))
    order = list(KINDS)
    findings.sort(key=lambda f: (order.index(f.kind), [p.as_posix() for p in f.paths]))
    return DoctorReport(root, classes, tuple(findings), len(layout), min_size)


def check_quarantine(data_dir: Path, destination: Path) -> None:
    """The checks a --quarantine folder must pass before anything is inspected or written.

    Raises:
        ConfigError: it lies inside the data folder, or under a file.
        ArtifactError: it cannot be written.
    """
    root, dest = Path(os.path.realpath(data_dir)), Path(os.path.realpath(destination))
    if dest == root or root in dest.parents:
        raise ConfigError(f"--quarantine '{destination}' is inside the data folder; training "
                          f"would read it as data. Choose a folder outside '{data_dir}'.")
    existing = destination
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--quarantine '{destination}' cannot be a folder: '{existing}' is a "
                          f"file. Choose another folder.")
    check_writable(destination)


def quarantine(report: DoctorReport, destination: Path,
               reporter: Reporter | None = None) -> list[tuple[Path, Path]]:
    """Moves the unusable files into `destination`, keeping their paths relative to the data
    folder, and reports each move as it happens. Never replaces anything there (a clash, even
    with a dangling link, gets a numbered name), and never leaves half a file: across disks a
    file is copied to a temporary name and renamed, and only then removed from the data.

    Raises:
        ConfigError, ArtifactError: see check_quarantine; ArtifactError also when a move
            fails (that file stays where it was; the moves before it are done and reported).
    """
    reporter = reporter or NullReporter()
    check_quarantine(report.root, destination)
    moved: list[tuple[Path, Path]] = []
    for rel in report.unusable_files():
        source, target = report.root / rel, destination / rel
        n = 1
        while os.path.lexists(target):
            target = destination / rel.with_name(f"{rel.stem}.{n}{rel.suffix}")
            n += 1
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _move(source, target)
        except OSError as exc:
            raise ArtifactError(
                f"Could not move '{source}' to '{target}' ({exc.strerror}); it stays where it "
                f"was. {len(moved)} file(s) were moved before it.") from exc
        reporter.info(f"Moved '{source}' -> '{target}'")
        moved.append((source, target))
    return moved


def _move(source: Path, target: Path) -> None:
    """A rename on one file system (a link or a FIFO moves as itself); across two, a copy
    under a temporary name that becomes `target` only when whole, then the source's removal.
    A link is made again there, pointing where it pointed, and a FIFO made anew: reading
    either could block or never end.

    Raises:
        OSError: the move failed (EXDEV for a device or socket across disks, which only
            its creator can make again); the source stays.
    """
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    mode = os.lstat(source).st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(target, stat.S_IMODE(mode))
    elif stat.S_ISREG(mode):
        with atomic_path(target) as tmp:
            shutil.copy2(source, tmp)
    else:
        raise OSError(errno.EXDEV, "a device or socket cannot be moved to another disk",
                      str(source))
    os.unlink(source)
