"""Feature files (`extract -o`): one .npz, or at cluster scale a folder of .npz shards with an
index (`--shard-rows`), written shard by shard so no more than one shard is held in memory,
and read back by one reader that accepts both.

A sharded output is built in `OUT.partial/` and renamed onto OUT when complete; an extract
that was stopped keeps the shards it finished there, and the next run with the same images
and features reuses them (each shard records a digest of its images and of the feature spec).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import ArtifactError
from transferkit.files import atomic_path, npz_problem, replace_path

FEATURES_FORMAT = "transferkit-features"
SHARDS_FORMAT = "transferkit-feature-shards"
FEATURES_FORMAT_VERSION = 1
INDEX = "index.json"
_SHARD_NAME = re.compile(r"part-\d{5,9}\.npz")  # the only names an index may point at
_ARRAYS = ("features", "labels", "splits", "paths")


@dataclass(frozen=True)
class FeatureSet:
    """Features of images of a data folder, with labels, splits and relative paths."""

    features: np.ndarray  # (n, feature_dim) float32
    labels: np.ndarray  # (n,) int32 into class_names
    splits: np.ndarray  # (n,) str: train | val | test
    paths: np.ndarray  # (n,) str, relative to the data folder
    class_names: tuple[str, ...]
    meta: dict[str, Any]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == name
        return self.features[mask], self.labels[mask]


def save_features(path: Path, features: FeatureSet, digest: str | None = None) -> None:
    """Writes a FeatureSet as one .npz: plain arrays and a JSON string, no pickles; a shard
    also carries the digest its index lists."""
    meta = {"format": FEATURES_FORMAT, "format_version": FEATURES_FORMAT_VERSION,
            **features.meta, "class_names": list(features.class_names)}
    extra = {} if digest is None else {"digest": np.array(digest)}
    # written through an open file: numpy appends .npz to a path not ending in it (f.NPZ)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, features=features.features.astype(np.float32),
                 labels=features.labels.astype(np.int32),
                 splits=features.splits.astype(str), paths=features.paths.astype(str),
                 meta=np.array(json.dumps(meta)), **extra)


def _read_npz(path: Path, digest: str | None = None) -> FeatureSet:
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in _ARRAYS}
            found = str(npz["digest"]) if "digest" in npz.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        reason = npz_problem(exc) if not isinstance(exc, json.JSONDecodeError) else \
            "its metadata is not JSON"
        raise ArtifactError(f"Could not read feature file '{path}' ({reason}). Run "
                            f"`transferkit extract` again.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
        raise ArtifactError(f"'{path}' is not a transferkit feature file.")
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1 or arrays["features"].ndim != 2 or (digest and found != digest):
        raise ArtifactError(f"The feature file '{path}' is damaged (its arrays disagree, or it "
                            f"is not the shard its index names). Run `transferkit extract` "
                            f"again.")
    return FeatureSet(class_names=tuple(meta.pop("class_names")), meta=meta, **arrays)


def iter_features(path: Path) -> Iterator[FeatureSet]:
    """The feature file at `path` one shard at a time (a single .npz is one shard): how a
    reader goes through millions of rows without holding them all."""
    if not path.is_dir():
        yield _read_npz(path)
        return
    for entry in _read_index(path)["shards"]:
        part = _read_npz(path / entry["file"], entry["digest"])
        if len(part.labels) != entry["rows"]:
            raise ArtifactError(f"The shard '{path / entry['file']}' holds {len(part.labels)} "
                                f"rows; its index says {entry['rows']}. Run `transferkit "
                                f"extract` again.")
        yield part


def load_features(path: Path) -> FeatureSet:
    """The whole feature file at `path` (one .npz or a sharded folder) in memory."""
    parts = list(iter_features(path))
    if not parts:
        raise ArtifactError(f"The feature folder '{path}' has no shards.")
    return FeatureSet(
        **{k: np.concatenate([getattr(p, k) for p in parts]) for k in _ARRAYS},
        class_names=parts[0].class_names,
        meta=parts[0].meta)


def _read_index(folder: Path) -> dict[str, Any]:
    """A shard folder's index, checked: only shard names inside the folder, counts that add up."""
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"'{folder}' is not a transferkit feature file or shard folder: "
                            f"{folder / INDEX} could not be read ({exc}).") from exc
    if not (isinstance(index, dict) and index.get("format") == SHARDS_FORMAT
            and isinstance(index.get("shards"), list)
            and all(_valid_entry(entry) for entry in index["shards"])
            and sum(entry["rows"] for entry in index["shards"]) == index.get("rows")):
        raise ArtifactError(f"The index '{folder / INDEX}' is not a valid transferkit shard "
                            f"index. Run `transferkit extract` again.")
    return index


def _valid_entry(entry: Any) -> bool:
    """A shard entry names a shard file of this folder (no path), its rows and its digest."""
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str)
            and _SHARD_NAME.fullmatch(entry["file"]) is not None
            and isinstance(entry.get("rows"), int) and entry["rows"] >= 0
            and isinstance(entry.get("digest"), str))


class ShardWriter:
    """Writes a sharded feature folder at `target` through `target.partial/`, reusing the
    shards a stopped run finished there when their digest matches."""

    def __init__(self, target: Path, spec_key: str) -> None:
        self.target = target
        self.partial = target.with_name(target.name + ".partial")
        self.spec_key = spec_key
        self.shards: list[dict[str, Any]] = []
        if self.partial.exists() and not self.partial.is_dir():
            raise ArtifactError(f"'{self.partial}' is a file, where extract builds the shard "
                                f"folder before renaming it to '{target}'. Move that file, or "
                                f"choose another -o.")
        self.partial.mkdir(parents=True, exist_ok=True)

    def digest(self, hashes: tuple[str, ...], splits: np.ndarray) -> str:
        """What a shard holds: the feature spec, and each image's content and split."""
        payload = json.dumps([self.spec_key, list(hashes), splits.astype(str).tolist()])
        return hashlib.sha256(payload.encode()).hexdigest()

    def done(self, digest: str) -> FeatureSet | None:
        """The next shard, if a stopped run already wrote it with this digest."""
        path = self.partial / self._name()
        if not path.exists():
            return None
        try:
            found = _read_npz(path, digest)
        except ArtifactError:
            return None  # another run's or a damaged shard: written again
        self.shards.append({"file": path.name, "rows": len(found.labels), "digest": digest})
        return found

    def write(self, features: FeatureSet, digest: str) -> None:
        name = self._name()
        save_features(self.partial / name, features, digest)
        self.shards.append({"file": name, "rows": len(features.labels), "digest": digest})

    def finish(self, meta: dict[str, Any], class_names: tuple[str, ...]) -> None:
        """Writes the index and puts the folder at the target (replacing what --overwrite
        allowed there)."""
        names = {s["file"] for s in self.shards}
        for stale in self.partial.iterdir():  # shards of a longer stopped run
            if stale.name not in names:
                stale.unlink()
        index = {"format": SHARDS_FORMAT, "format_version": FEATURES_FORMAT_VERSION,
                 "rows": sum(s["rows"] for s in self.shards), "shards": self.shards,
                 "class_names": list(class_names), **meta}
        with atomic_path(self.partial / INDEX) as tmp:
            tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
        replace_path(self.partial, self.target)

    def _name(self) -> str:
        return f"part-{len(self.shards):05d}.npz"
