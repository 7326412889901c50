"""Atomic writes: whole files, the umask respected, flushed to disk before the rename."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from transferkit.errors import ArtifactError
from transferkit.files import check_new_output, write_text


def test_existing_outputs_are_never_replaced_silently(tmp_path: Path):
    check_new_output(tmp_path / "new", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_new_output(empty, overwrite=False, what="run directory")
    (empty / "x").write_text("keep me")
    with pytest.raises(ArtifactError, match="already exists and is not empty.*--overwrite"):
        check_new_output(empty, overwrite=False, what="run directory")
    with pytest.raises(ArtifactError, match="did not write .x.*Nothing was deleted"):
        check_new_output(empty, overwrite=True, what="run directory")
    check_new_output(empty, overwrite=True, what="run directory", writes=("x",))
    with pytest.raises(ArtifactError, match="is a file"):
        check_new_output(empty / "x", overwrite=True, what="run directory")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int, mode: int):
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "out.txt", "hello")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == mode
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temp file left


def test_atomic_writes_fsync_the_file_then_the_folder_before_and_after_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync folder" if os.path.isdir(target) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text(tmp_path / "out.txt", "durable")
    assert events == ["fsync file", "rename", "fsync folder"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path):
    from transferkit.files import atomic_path

    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk trouble")
    assert (tmp_path / "out.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
