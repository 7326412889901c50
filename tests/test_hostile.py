"""A careless, then hostile, user (issue 33): no command deletes what it did not write, hangs,
or says what is not so. One test per class of fault, each over every command it concerns."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import Recorder, make_image
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.config import DataConfig, FinetuneConfig
from transferkit.errors import ArtifactError
from transferkit.files import check_new_output, json_text, restore_names

runner = CliRunner()
TINY = ["--base", "tiny", "--weights", "none", "--image-size", "32"]


def said(text: str) -> str:
    return " ".join(text.split())


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("command", [
    ["audit", "{data}", "-o", "{target}", *TINY],
    ["evaluate", "{run}", "-o", "{target}"],
    ["extract", "{data}", "-o", "{target}", "--shard-rows", "5", *TINY],
    ["cv", "{data}", "-o", "{target}", "--folds", "2", *TINY],
    ["finetune", "{data}", "-o", "{target}", *TINY],
    ["export", "{run}", "-o", "{target}"],
])
@pytest.mark.parametrize("victim", ["a finetune run", "a folder of the user's"])
def test_overwrite_never_deletes_what_the_command_did_not_write(
        command: list[str], victim: str, trained_run: Path, image_folder: Path, tmp_path: Path):
    target = tmp_path / "target"
    if victim == "a finetune run" and command[0] != "finetune":
        shutil.copytree(trained_run, target)
    else:
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
        (target / "notes").mkdir()
        (target / "notes" / "a.txt").write_text("more")
    before = _tree(target)
    args = [a.format(data=image_folder, run=trained_run, target=target) for a in command]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 1, result.output
    assert "did not write" in said(result.stderr) and "Nothing was deleted" in said(
        result.stderr)
    assert _tree(target) == before


def test_overwrite_replaces_what_the_command_wrote(trained_run: Path, tmp_path: Path):
    target = tmp_path / "ev"
    for _ in range(2):
        result = runner.invoke(app, ["evaluate", str(trained_run), "-o", str(target),
                                     "--overwrite"])
        assert result.exit_code == 0, result.output
    assert {"confusion.png", "metrics.json"} <= {p.name for p in target.iterdir()}


@pytest.mark.parametrize("command, bad", [
    (["extract", "{data}", *TINY, "-o"], ["f.csv", "features", "f.json"]),
    (["select", "{data}", "--pool", "{data}", *TINY, "-o"], ["x.json", "picks"]),
    (["augment-preview", "{data}", "-o"], ["x.jpg", "preview"]),
    (["doctor", "{data}", "-o"], ["report.csv", "report"]),
    (["predict", "{run}", "{data}", "-o"], ["p.txt", "p"]),
    (["export", "{run}", "--format", "onnx", "-o"], ["m.tflite", "m"]),
])
def test_an_output_suffix_is_honoured_or_refused_before_any_work(
        command: list[str], bad: list[str], trained_run: Path, image_folder: Path,
        tmp_path: Path):
    for name in bad:
        args = [a.format(data=image_folder, run=trained_run) for a in command]
        result = runner.invoke(app, [*args, str(tmp_path / name)])
        assert result.exit_code == 2, (name, result.output)
        assert "name it with" in said(result.stderr) or "must end in" in said(result.stderr)
        assert not any(tmp_path.iterdir()), name


def test_features_named_in_capitals_are_written_where_asked(image_folder: Path,
                                                           tmp_path: Path):
    target = tmp_path / "F.NPZ"
    result = runner.invoke(app, ["extract", str(image_folder), "-o", str(target), *TINY])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["F.NPZ"] and target.stat().st_size > 0
    from transferkit.feature_files import load_features

    assert len(load_features(target).features) == 18


def test_no_output_is_written_inside_an_input_folder(image_folder: Path, tmp_path: Path):
    pool = tmp_path / "pool"
    pool.mkdir()
    make_image("circles", 40).save(pool / "new.png")
    for inside in (pool / "picks.csv", pool / "sub" / "picks.csv"):
        result = runner.invoke(app, ["select", str(image_folder), "--pool", str(pool), "-o",
                                     str(inside), *TINY])
        assert result.exit_code == 1 and "inside the pool folder" in said(result.stderr)
    assert [p.name for p in pool.iterdir()] == ["new.png"]
    before = sorted(p.name for p in image_folder.iterdir())
    result = runner.invoke(app, ["doctor", str(image_folder), "-o",
                                 str(image_folder / "report.json")])
    assert result.exit_code == 1 and "inside the data folder" in said(result.stderr)
    assert sorted(p.name for p in image_folder.iterdir()) == before


def test_a_seed_out_of_range_is_a_usage_error_for_every_command(image_folder: Path,
                                                                tmp_path: Path):
    for command in (["finetune", str(image_folder), "-o", str(tmp_path / "r")],
                    ["cv", str(image_folder), "-o", str(tmp_path / "r")],
                    ["extract", str(image_folder), "-o", str(tmp_path / "f.npz")],
                    ["audit", str(image_folder), "-o", str(tmp_path / "a")],
                    ["select", str(image_folder), "--pool", str(tmp_path)],
                    ["augment-preview", str(image_folder), "-o", str(tmp_path / "p.png")],
                    ["bases", "--rank", str(image_folder)]):
        for seed in ("-1", str(2**32)):
            result = runner.invoke(app, [*command, "--seed", seed])
            assert result.exit_code == 2, (command, result.output)
            assert "--seed must be a whole number from 0" in said(result.stderr)
            assert "Traceback" not in result.output


def test_names_that_are_not_utf8_follow_one_lossless_convention():
    odd = os.fsdecode(b"mo\xffss")
    value = {"class_names": ["plain", odd], "label": odd, "rows": [{"path": odd}],
             "n": 3, "counts": {odd: 4, "plain": 2}}
    text = json_text(value)
    text.encode("utf-8")  # strict: no lone surrogates
    assert "\\udc" not in text
    written = json.loads(text)
    assert written["label"] == "mo\ufffdss"
    assert base64.b64decode(written["label_bytes"]) == b"mo\xffss"
    assert written["class_names_bytes"][0] is None
    assert restore_names(written) == value


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose classes are folders named in bytes that are not UTF-8."""
    root = tmp_path_factory.mktemp("odd")
    data = root / "data"
    for kind, raw in (("circles", b"mo\xffss"), ("squares", b"plain")):
        folder = Path(os.fsdecode(os.fsencode(data) + b"/" + raw))
        folder.mkdir(parents=True)
        for i in range(6):
            make_image(kind, i).save(folder / f"{i}.png")
    result = runner.invoke(app, ["finetune", str(data), "-o", str(root / "run"),
                                 "--finetune-epochs", "0", *TINY])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_a_class_name_that_is_not_utf8_is_written_and_read_losslessly(odd_run: Path,
                                                                      tmp_path: Path):
    from transferkit.runs.directory import read_record

    text = (odd_run / "run.json").read_bytes().decode("utf-8")
    assert "\\udc" not in text
    assert os.fsdecode(b"mo\xffss") in read_record(odd_run).class_names
    result = runner.invoke(app, ["export", str(odd_run), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert b"mo\xffss\n" in (tmp_path / "m" / "labels.txt").read_bytes()
    json.loads((tmp_path / "m" / "transferkit.json").read_bytes().decode("utf-8"))
    result = runner.invoke(app, ["predict", str(odd_run), str(odd_run.parent / "data"),
                                 "--format", "json", "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p.json").read_bytes().decode("utf-8"))
    odd = [r for r in rows if "label_bytes" in r or "true_label_bytes" in r]
    assert odd and all(base64.b64decode(r["true_label_bytes"]) == b"mo\xffss" for r in odd
                       if "true_label_bytes" in r)


def test_top_k_beyond_the_classes_lists_the_classes(trained_run: Path, image_folder: Path,
                                                    tmp_path: Path):
    result = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "--top-k",
                                 "1000000", "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert "label_3" in header and "label_4" not in header


def test_resume_of_another_commands_run_says_what_to_do(trained_run: Path, image_folder: Path,
                                                        tmp_path: Path):
    head = tmp_path / "head"
    result = runner.invoke(app, ["extract", str(image_folder), "-o", str(tmp_path / "f.npz"),
                                 "--train-head", str(head), "--head-epochs", "1", *TINY])
    assert result.exit_code == 0, result.output
    for command, run, expected in (("finetune", head, "was written by `transferkit extract`"),
                                   ("cv", trained_run, "was written by `transferkit finetune`"),
                                   ("finetune", trained_run, "complete run")):
        result = runner.invoke(app, [command, "--resume", str(run)])
        assert result.exit_code == 1, result.output
        assert expected in said(result.stderr) and "Traceback" not in result.output


def test_a_blank_tf_config_is_a_clear_error(image_folder: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TF_CONFIG", " ")
    result = runner.invoke(app, ["finetune", str(image_folder), "-o", str(tmp_path / "r"),
                                 "--strategy", "multiworker", *TINY])
    assert result.exit_code == 2, result.output
    assert "TF_CONFIG is set but empty" in said(result.stderr)
    assert not (tmp_path / "r").exists()


def test_a_cluster_that_does_not_answer_is_refused_at_once(trained_run: Path,
                                                          image_folder: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for args, env in (([f"--ray-address=127.0.0.1:{port}"], None),
                      ([], f"localhost:{port}")):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        result = runner.invoke(app, ["predict", str(trained_run), str(image_folder),
                                     "--engine", "ray", *args])
        assert result.exit_code == 1, result.output
        assert "Nothing answers at the Ray cluster address" in said(result.stderr)
    import threading

    with socket.socket() as foreign:  # a web server, say: it answers, but not as Ray
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()

        def answer_as_http() -> None:
            client, _ = foreign.accept()
            with client:
                client.recv(64)
                client.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_as_http, daemon=True).start()
        address = f"127.0.0.1:{foreign.getsockname()[1]}"
        result = runner.invoke(app, ["predict", str(trained_run), str(image_folder),
                                     "--engine", "ray", "--ray-address", address])
    assert result.exit_code == 1, result.output
    assert "but not a Ray cluster" in said(result.stderr)


def test_a_disk_full_before_any_checkpoint_can_be_resumed_once_freed(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import errno

    import transferkit.commands.finetune as recipe

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "probe.keras")

    monkeypatch.setattr(recipe, "fit_probe", disk_full)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError):
        recipe.finetune(FinetuneConfig(
            adapt=False, data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
            output=run_dir, weights="none", base="tiny", finetune_epochs=0))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "No space left" in record["failure"]
    monkeypatch.undo()
    result = runner.invoke(app, ["finetune", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_a_complete_run_whose_model_is_gone_is_not_called_unfinished(trained_run: Path,
                                                                     tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model.keras").unlink()
    result = runner.invoke(app, ["predict", str(run), str(tmp_path)])
    assert result.exit_code == 1
    assert "complete run, but its model.keras is gone" in said(result.stderr)


def test_a_signal_during_cv_leaves_a_record_and_cv_resume_finishes_it(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import transferkit.commands.cv as cv

    real, calls = cv.finetune, []

    def second_fold_stopped(config, reporter=None, splits=None):
        calls.append(config.output)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(config, reporter, splits)

    monkeypatch.setattr(cv, "finetune", second_fold_stopped)
    run = tmp_path / "cv"
    args = ["cv", str(image_folder), "-o", str(run), "--folds", "2", "--finetune-epochs", "0",
            "--no-adapt", *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert f"transferkit cv --resume {run}" in said(result.stderr)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted" and record["command"] == "cv"
    assert record["stopped"]["phase"] == "fold 2 of 2"
    assert len(record["cross_validation"]["fold_scores"]) == 1
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and f"cv --resume {run}" in said(again.stderr)
    monkeypatch.undo()
    reporter = Recorder()
    monkeypatch.setattr("transferkit.cli.console.RichReporter", lambda: reporter)
    resumed = runner.invoke(app, ["cv", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert any("Fold 1 finished before" in m for m in reporter.messages)
    done = json.loads((run / "run.json").read_text())
    assert done["status"] == "complete" and len(done["cross_validation"]["fold_scores"]) == 2


def test_check_new_output_refuses_a_folder_it_does_not_recognise(tmp_path: Path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    check_new_output(folder, True, "evaluation folder", writes=("metrics.json",))
    (folder / "mine.txt").write_text("x")
    with pytest.raises(ArtifactError, match="mine.txt"):
        check_new_output(folder, True, "evaluation folder", writes=("metrics.json",))


def test_a_pool_of_copies_of_the_labelled_images_is_refused(image_folder: Path,
                                                            tmp_path: Path):
    pool = tmp_path / "pool"
    shutil.copytree(image_folder, pool)
    for command in (["finetune", str(image_folder), "-o", str(tmp_path / "run"),
                     "--unlabeled", str(pool), "--finetune-epochs", "0", "--no-adapt", *TINY],
                    ["select", str(image_folder), "--pool", str(pool), "-o",
                     str(tmp_path / "picks.csv"), *TINY]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        assert "already in the labelled data" in said(result.stderr)


def test_a_cache_that_cannot_be_written_is_skipped_with_a_note(
        trained_run: Path, image_folder: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    from transferkit import cache

    # /sys takes no new folder, even from root
    monkeypatch.setenv("TRANSFERKIT_HOME", "/sys/transferkit-cache")
    monkeypatch.setattr(cache, "_held", [])
    monkeypatch.setattr(cache, "_stand_in", [])
    result = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "-o",
                                 str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "cannot be written" in said(result.stderr)
    assert "TRANSFERKIT_HOME" in said(result.stderr) and (tmp_path / "p.csv").is_file()
    assert cache._stand_in and cache.cache_path(cache.FEATURES).parent == cache._stand_in[0]


def test_upgrade_of_a_run_it_cannot_write_says_to_copy_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "old"
    run.mkdir()
    (run / "run.json").write_text("{}")
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # a read-only mount
    result = runner.invoke(app, ["upgrade", str(run)])
    assert result.exit_code == 1
    assert "upgrade rewrites the run in place" in said(result.stderr)
    assert "Choose another output" not in said(result.stderr)


def test_quarantine_moves_special_files_as_themselves(image_folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    import errno
    import stat

    from transferkit.commands import doctor

    real_rename = os.rename

    def across_disks(source, target):  # every move crosses a file system
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for crossing in (False, True):
        quarantine = tmp_path / f"q{crossing}"
        work = tmp_path / f"data{crossing}"
        shutil.copytree(image_folder, work)
        os.mkfifo(work / "circles" / "pipe.png")
        (work / "squares" / "zero.png").symlink_to("/dev/zero")
        (work / "stripes" / "loop.png").symlink_to(work / "stripes" / "loop.png")
        if crossing:
            monkeypatch.setattr(doctor.os, "rename", across_disks)
        result = runner.invoke(app, ["doctor", str(work), "--quarantine", str(quarantine)])
        monkeypatch.setattr(doctor.os, "rename", real_rename)
        assert "Moved 3 unusable file(s)" in said(result.stderr), result.output
        assert stat.S_ISFIFO(os.lstat(quarantine / "circles" / "pipe.png").st_mode)
        assert os.readlink(quarantine / "squares" / "zero.png") == "/dev/zero"
        assert os.path.islink(quarantine / "stripes" / "loop.png")
        assert runner.invoke(app, ["doctor", str(work)]).exit_code == 0


def test_a_damaged_array_file_is_never_met_with_advice_to_load_it_unsafely(
        trained_run: Path, image_folder: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "novelty.npz").write_text("not an archive at all")
    (tmp_path / "f.npz").write_text("hello")
    result = runner.invoke(app, ["predict", str(run), str(image_folder)])
    assert result.exit_code == 1 and "is damaged" in said(result.stderr)
    assert "pickle" not in result.output
    from transferkit.feature_files import load_features

    with pytest.raises(ArtifactError, match="not a NumPy .npz archive") as refused:
        load_features(tmp_path / "f.npz")
    assert "pickle" not in str(refused.value)


def test_a_val_folder_missing_a_class_is_named_for_what_it_is(presplit_folder: Path,
                                                              tmp_path: Path):
    from transferkit.data.folders import load_splits

    data = tmp_path / "data"
    shutil.copytree(presplit_folder, data)
    missing = sorted(p for p in (data / "val").iterdir())[0]
    shutil.rmtree(missing)
    reporter = Recorder()
    load_splits(data, 0.2, 0, reporter)
    warning = " ".join(reporter.warnings)
    assert missing.name in warning and "The val/ folder has no usable image" in warning
    assert "single image" not in warning


def test_a_list_on_stdin_behaves_like_a_folder(trained_run: Path, image_folder: Path,
                                               tmp_path: Path):
    odd = tmp_path / "odd"
    odd.mkdir()
    os.mkfifo(odd / "pipe.png")
    (odd / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (odd / "loop.png").symlink_to(odd / "loop.png")
    good = sorted(image_folder.rglob("*.png"))[:2]
    listed = [*good, tmp_path / "gone.png", *sorted(odd.iterdir())]
    result = runner.invoke(app, ["predict", str(trained_run), "-", "-o",
                                 str(tmp_path / "p.csv")],
                           input="".join(f"{p}\n" for p in listed))
    assert result.exit_code == 0, result.output
    import csv

    with open(tmp_path / "p.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == len(listed) and all(rows[p.name]["label"] for p in good)
    assert all(rows[name]["error"] for name in ("gone.png", "pipe.png", "broken.png",
                                                 "loop.png"))
    # the same files in a folder: the same rows
    folder = runner.invoke(app, ["predict", str(trained_run), str(odd), "-o",
                                 str(tmp_path / "q.csv")])
    assert folder.exit_code == 1 and "None of the 3 file(s)" in said(folder.stderr)


def test_two_spellings_of_one_setting_are_refused(image_folder: Path, tmp_path: Path):
    run = ["finetune", str(image_folder), "-o", str(tmp_path / "r"), *TINY]
    result = runner.invoke(app, [*run, "--epochs", "2", "--head-epochs", "1"])
    assert result.exit_code == 2 and "old name of --head-epochs" in said(result.stderr)
    for text in ('learning_rate = 0.01\n"learning-rate" = 0.02\n',
                 'image_size = 32\n[data]\nimage_size = 64\n'):
        (tmp_path / "c.toml").write_text(text)
        result = runner.invoke(app, [*run, "--config", str(tmp_path / "c.toml")])
        assert result.exit_code == 2, result.output
        assert "sets" in said(result.stderr) and "twice" in said(result.stderr)
    result = runner.invoke(app, [*run, "--no-augment", "--mixup", "0.2", "--cutmix", "1",
                                 "--randaugment", "2"])
    assert result.exit_code == 2
    assert "--no-augment turns augmentation off, but --mixup, --cutmix, --randaugment" in said(
        result.stderr)
    assert not (tmp_path / "r").exists()


def test_serve_refuses_a_busy_port_or_a_foreign_host_before_saying_serving(trained_run: Path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", str(trained_run), "--port", str(port)])
    assert result.exit_code == 1, result.output
    assert "another program listens on that port" in said(result.stderr)
    assert "Serving" not in result.output and "Errno" not in result.output
    for host in ("192.0.2.77", "no-such-host.invalid"):  # TEST-NET: no address of ours
        result = runner.invoke(app, ["serve", str(trained_run), "--host", host])
        assert result.exit_code == 2, result.output
        assert "Serving" not in result.output


def test_a_lite_base_from_scratch_gives_features_that_can_learn():
    import numpy as np

    from transferkit.bases.efficientnet_lite import LITE_VARIANTS, build_efficientnet_lite

    model = build_efficientnet_lite(LITE_VARIANTS["efficientnet_lite0"], (64, 64, 3))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)).astype("float32")
    features = model.predict(images, verbose=0).mean(axis=(1, 2))
    assert np.abs(features).mean() > 0.01  # Glorot's init gave about 1e-12
    assert features.std(axis=0).mean() > 1e-3  # and images differ


def test_a_model_that_answers_one_class_for_all_of_val_is_named():
    from types import SimpleNamespace

    import numpy as np

    from transferkit.commands.finetune import _warn_if_one_answer

    reporter = Recorder()
    t = SimpleNamespace(reporter=reporter, config=SimpleNamespace(weights="none"),
                        splits=SimpleNamespace(class_names=("a", "b"),
                                               val=SimpleNamespace(labels=np.array([0, 1, 1]))))
    _warn_if_one_answer(t, np.array([[0.4, 0.6]] * 3))
    assert "answers 'b' for every one of the 3 val images" in " ".join(reporter.warnings)
    _warn_if_one_answer(t, np.array([[0.4, 0.6], [0.7, 0.3], [0.1, 0.9]]))
    assert len(reporter.warnings) == 1


COMMANDS = ("finetune", "cv", "audit", "select", "serve", "extract", "predict", "evaluate",
            "augment-preview", "doctor", "export", "upgrade", "bases", "cache")


def test_help_at_80_columns_cuts_nothing_and_flags_take_no_type():
    for command in ("", *COMMANDS):
        for flag in ("--help", "--help-all"):
            result = runner.invoke(app, [*command.split(), flag], env={"COLUMNS": "80"})
            if flag == "--help-all" and result.exit_code != 0:
                continue  # a command without advanced options
            assert result.exit_code == 0, (command, result.output)
            assert "…" not in result.output, (command, flag)
            assert "<bool>" not in result.output, (command, flag)
            assert result.output.count("--help-all") <= 1, command
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    # a command's summary is one paragraph, wrapped at the width, not broken where the
    # source broke it: no line of the commands panel ends mid-sentence after a short line
    assert "and keep\n" not in listing and "keep the simplest model" in " ".join(
        line.strip("│ ") for line in listing.splitlines())


def test_tables_at_80_columns_wrap_instead_of_cutting(trained_run: Path, image_folder: Path,
                                                     tmp_path: Path):
    from transferkit.bases import BASES

    listing = runner.invoke(app, ["bases"], env={"COLUMNS": "80"})
    assert listing.exit_code == 0, listing.output
    for spec in BASES.values():  # wrapped at spaces, never inside a number or a name
        assert spec.name in listing.stdout
        assert all(word in listing.stdout for word in spec.preprocessing.describe().split())
    result = runner.invoke(app, ["evaluate", str(trained_run), "-o", str(tmp_path / "ev")],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "1 circles" in result.output
    from rich.console import Console

    from transferkit.cli import console
    from transferkit.runs.records import Choice

    wide = Console(width=60, record=True)
    original, console.stdout = console.stdout, wide
    try:
        console.render_choice(Choice(kept="probe", n=40, val_correct={"probe": 37,
                                                                      "finetune": 36},
                                     comparisons=()), {"combined": 35, "upsampled": 36},
                              {"finetune"})
    finally:
        console.stdout = original
    shown = wide.export_text()
    assert "combined" in shown and "35/40" in shown and "upsampled" in shown
    assert "…" not in shown
    # simplest first: what was fitted before the stages comes before them
    assert shown.index("probe") < shown.index("combined") < shown.index("finetune")


def test_overwrite_never_replaces_a_file_of_another_commands_folder(
        trained_run: Path, image_folder: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _tree(run)
    for command in (["predict", str(run), str(image_folder), "-o", str(run / "run.json")],
                    ["doctor", str(image_folder), "-o", str(run / "run.json")],
                    ["augment-preview", str(image_folder), "-o", str(run / "curves.png")],
                    ["extract", str(image_folder), "-o", str(run / "novelty.npz"), *TINY]):
        if command[0] == "augment-preview" and not (run / "curves.png").exists():
            (run / "curves.png").write_bytes(b"a run's curves")
            before = _tree(run)
        result = runner.invoke(app, [*command, "--overwrite"])
        assert result.exit_code == 1, (command, result.output)
        assert "is part of a transferkit run" in said(result.stderr), command
        assert _tree(run) == before
    for _ in range(2):  # its own file beside the run's is replaced as asked
        result = runner.invoke(app, ["predict", str(run), str(image_folder), "-o",
                                     str(run / "preds.csv"), "--overwrite"])
        assert result.exit_code == 0, result.output


def test_cache_clear_deletes_only_what_transferkit_cached(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "mine"  # a TRANSFERKIT_HOME pointed at a folder of the user's
    (home / "features").mkdir(parents=True)
    (home / "converted").mkdir()
    (home / "features" / "notes.txt").write_text("mine")
    (home / "converted" / "holiday.png").write_bytes(b"mine")
    (home / "features" / ("a" * 24 + ".npz")).write_bytes(b"cached")
    (home / "converted" / ("b" * 64 + "-v1.png")).write_bytes(b"cached")
    (home / "weights").mkdir()
    (home / "weights" / "efficientnet_lite0_imagenet_0123456789ab.weights.h5").write_bytes(b"w")
    monkeypatch.setenv("TRANSFERKIT_HOME", str(home))
    result = runner.invoke(app, ["cache", "--clear"])
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) == [
        ".in-use.lock", "converted/holiday.png", "features/notes.txt",
        "weights/efficientnet_lite0_imagenet_0123456789ab.weights.h5"]
    runner.invoke(app, ["cache", "--clear", "--weights"])
    assert not (home / "weights").exists() and (home / "features" / "notes.txt").exists()


def test_the_report_says_what_the_probe_is_and_why_the_kept_model_was_kept(trained_run: Path):
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    assert "a logistic regression on the frozen base&#x27;s features" in page or \
        "a logistic regression on the frozen base's features" in page
    assert "kept model" in page and "more than noise" in page


def test_native_log_lines_are_kept_off_the_console_and_ours_are_not():
    import subprocess
    import sys

    script = (
        "import os, sys, time\n"
        "from transferkit.quiet import native_lines_filtered\n"
        "with native_lines_filtered():\n"
        "    os.write(2, b'E0000 00:00:1796593777.374767   32181 base_collective_executor.cc"
        ":361] BaseCollectiveExecutor::StartAbort UNAVAILABLE\\n')\n"
        "    print('Epoch 3: another worker stopped answering', file=sys.stderr, flush=True)\n"
        "    os.write(2, b'Progress 40%')\n"
        "    time.sleep(0.5)\n"
        "    os.write(2, b'\\rProgress 100%\\n')\n"
        "print('after', file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (b"Epoch 3: another worker stopped answering\nProgress 40%"
                           b"\rProgress 100%\nafter\n")


def test_serve_answers_names_that_are_not_utf8_as_valid_json(odd_run: Path):
    from transferkit.commands.serve import _respond, describe, load_served
    from transferkit.runs.directory import read_record

    served = load_served(odd_run)
    answer = _respond(describe(served))  # GET /metadata; POST /predict renders the same way
    body = json.loads(answer.body.decode("utf-8"))  # strict UTF-8: Starlette's own failed
    assert restore_names(body)["classes"] == list(read_record(odd_run).class_names)
    assert any(raw for raw in body["classes_bytes"] if raw)


def test_a_format_that_contradicts_the_output_name_is_refused(trained_run: Path,
                                                              image_folder: Path,
                                                              tmp_path: Path):
    result = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "-o",
                                 str(tmp_path / "x.csv"), "--format", "json"])
    assert result.exit_code == 2 and "whose name says csv" in said(result.stderr)
    assert not (tmp_path / "x.csv").exists()
    agreed = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "-o",
                                 str(tmp_path / "x.json"), "--format", "json"])
    assert agreed.exit_code == 0, agreed.output


def test_an_option_that_only_qualifies_another_is_refused_alone(tmp_path: Path,
                                                                monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["cache", "--weights"])
    assert result.exit_code == 2 and "pass both" in said(result.stderr)
