"""`doctor` on a folder with every kind of trouble: each finding, and quarantine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_class_folder

from transferkit.commands.doctor import diagnose, quarantine
from transferkit.errors import ArtifactError, ConfigError, DataError


@pytest.fixture(scope="module")
def report(messy_folder: Path):
    return diagnose(messy_folder, min_size=32)


def _paths(report, kind: str) -> set[str]:
    return {p.as_posix() for f in report.findings if f.kind == kind for p in f.paths}


def test_unusable_files_by_kind(report):
    assert _paths(report, "empty") == {"train/circles/empty.jpg"}
    assert _paths(report, "truncated") == {"train/circles/truncated.jpg"}
    assert _paths(report, "unreadable") == {"train/circles/notes.jpg"}
    assert _paths(report, "not_image") == {"train/circles/README.txt"}


def test_content_size_and_duplicate_findings(report):
    assert _paths(report, "extension_mismatch") == {"train/circles/png_named.jpg"}
    [mismatch] = [f for f in report.findings if f.kind == "extension_mismatch"]
    assert mismatch.detail == "PNG content named '.jpg'"
    assert _paths(report, "too_small") == {"train/squares/tiny.png"}
    assert _paths(report, "leak") == {"train/circles/circles_1.png", "val/circles/leaked.png"}
    assert _paths(report, "conflict") == {"train/squares/squares_1.png",
                                          "train/stripes/looks_square.png"}
    assert not _paths(report, "duplicate") and not report.clean


def test_counts_modes_and_imbalance(report):
    by_class = {(c.split, c.name): c for c in report.classes}
    circles = by_class[("train", "circles")]
    assert circles.unusable == 4
    assert circles.modes == {"CMYK": 1, "I;16": 1, "P": 2, "RGB": 7, "RGBA": 1}
    assert by_class[("train", "squares")].images == 5
    assert by_class[("val", "stripes")].images == 2
    assert report.imbalance()["train"] == pytest.approx(12 / 5)
    as_dict = report.to_dict()
    assert as_dict["clean"] is False and len(as_dict["findings"]) == len(report.findings)


def test_clean_folder_and_structural_findings(tmp_path: Path):
    write_class_folder(tmp_path / "data")
    assert diagnose(tmp_path / "data", 32).clean
    (tmp_path / "data" / "squares" / "copy.png").write_bytes(
        (tmp_path / "data" / "squares" / "squares_1.png").read_bytes())
    (tmp_path / "data" / "stray.jpg").write_bytes(
        (tmp_path / "data" / "circles" / "circles_0.jpg").read_bytes())
    (tmp_path / "data" / "empty_class").mkdir()
    (tmp_path / "data" / "notes.md").write_text("notes beside the classes are fine")
    found = {f.kind for f in diagnose(tmp_path / "data", 32).findings}
    assert found == {"duplicate", "stray_image", "empty_class"}
    single = tmp_path / "single"
    write_class_folder(single)
    for extra in ("squares", "stripes"):
        shutil.rmtree(single / extra)
    assert {f.kind for f in diagnose(single, 32).findings} == {"few_classes"}
    with pytest.raises(DataError, match="does not exist"):
        diagnose(tmp_path / "missing", 32)


def test_quarantine_moves_unusable_files_keeping_paths(messy_folder: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(messy_folder, data)
    report = diagnose(data, 32)
    with pytest.raises(ConfigError, match="inside the data folder"):
        quarantine(report, data / "bad")
    (tmp_path / "bad" / "train" / "circles").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "circles" / "empty.jpg").write_text("an earlier quarantine")
    moved = quarantine(report, tmp_path / "bad")
    assert len(moved) == 4
    assert not (data / "train" / "circles" / "truncated.jpg").exists()
    assert (tmp_path / "bad" / "train" / "circles" / "truncated.jpg").is_file()
    assert (tmp_path / "bad" / "train" / "circles" / "empty.1.jpg").is_file()  # no overwrite
    assert (tmp_path / "bad" / "train" / "circles" / "empty.jpg").read_text() == \
        "an earlier quarantine"
    assert {f.kind for f in diagnose(data, 32).findings}.isdisjoint(
        {"empty", "truncated", "unreadable", "not_image"})


def test_no_cache_decodes_again(messy_folder: Path, monkeypatch: pytest.MonkeyPatch):
    import transferkit.data.inspect as data

    diagnose(messy_folder, 32)  # fills the inspection memo
    decoded: list[Path] = []
    real = data.inspect_image
    monkeypatch.setattr(data, "inspect_image", lambda p: decoded.append(p) or real(p))
    diagnose(messy_folder, 32)
    assert decoded == []  # unchanged files come from the memo
    fresh = diagnose(messy_folder, 32, use_cache=False)
    assert len(decoded) == fresh.files


def _one_bad_file(root: Path, name: str = "broken.jpg", size: int = 10) -> Path:
    from conftest import write_class_folder

    write_class_folder(root, per_class=2)
    (root / "circles" / name).write_bytes(b"\xff\xd8" + b"x" * size)  # not a decodable JPEG
    return root


def test_quarantine_never_replaces_a_dangling_link(tmp_path: Path):
    data = _one_bad_file(tmp_path / "data")
    dest = tmp_path / "bad"
    (dest / "circles").mkdir(parents=True)
    (dest / "circles" / "broken.jpg").symlink_to(tmp_path / "nowhere")  # dangling
    moved = quarantine(diagnose(data, 32, use_cache=False), dest)
    assert [t.name for _, t in moved] == ["broken.1.jpg"]
    assert (dest / "circles" / "broken.jpg").is_symlink()  # untouched


def test_quarantine_under_a_file_is_refused_before_anything_happens(tmp_path: Path):
    from typer.testing import CliRunner

    from transferkit.cli.app import app

    data = _one_bad_file(tmp_path / "data")
    (tmp_path / "afile").write_text("mine")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["doctor", str(data), "-o", str(report), "--quarantine",
                                      str(tmp_path / "afile" / "bad")])
    assert result.exit_code == 2 and "is a file" in result.stderr
    assert not report.exists()  # the refusal comes first
    inside = CliRunner().invoke(app, ["doctor", str(data), "-o", str(report), "--quarantine",
                                      str(data / "bad")])
    assert inside.exit_code == 2 and not report.exists()
    assert (data / "circles" / "broken.jpg").exists()


def test_quarantine_onto_a_full_disk_leaves_no_partial_copy(tmp_path: Path):
    import subprocess

    data = _one_bad_file(tmp_path / "data", name="a_small.jpg", size=10)
    (data / "squares" / "z_large.jpg").write_bytes(b"\xff\xd8" + b"y" * 200_000)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        report = diagnose(data, 32, use_cache=False)
        with pytest.raises(ArtifactError, match=r"stays where it was\. 1 file\(s\) were moved"):
            quarantine(report, disk / "bad")
        assert (data / "squares" / "z_large.jpg").stat().st_size == 200_002  # intact
        assert not (data / "circles" / "a_small.jpg").exists()  # moved before the failure
        assert (disk / "bad" / "circles" / "a_small.jpg").exists()
        left = [p.name for p in (disk / "bad").rglob("*") if p.is_file()]
        assert left == ["a_small.jpg"]  # no truncated copy, no temp file
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
