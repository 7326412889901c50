"""A careless user's mistakes and accidents end in a clear message, a truthful run.json and
exit 1 or 2, never a traceback: one test per class of fault (issue 26)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETUP, Recorder
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.config import DataConfig, FinetuneConfig
from transferkit.errors import ArtifactError, RunInterrupted
from transferkit.files import check_new_output

runner = CliRunner()


def said(text: str) -> str:
    return " ".join(text.split())


def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path: Path,
                                                                       trained_run: Path,
                                                                       image_folder: Path):
    with pytest.raises(ArtifactError, match="Choose a shorter name"):
        check_new_output(tmp_path / ("x" * 300 + ".csv"), overwrite=False)
    # legal on its own, too long once the temporary name's suffix is added
    with pytest.raises(ArtifactError, match="allows 255 per name"):
        check_new_output(tmp_path / ("p" * 247 + ".csv"), overwrite=False)
    check_new_output(tmp_path / ("p" * 200 + ".csv"), overwrite=False)  # fits
    result = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "-o",
                                 str(tmp_path / ("y" * 250 + ".csv"))])
    assert result.exit_code == 1 and "Choose a shorter name" in said(result.stderr)
    assert "Traceback" not in result.output


def test_transferkit_home_that_is_a_file_is_a_clear_error(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("TRANSFERKIT_HOME", str(home))
    result = runner.invoke(app, ["cache"])
    assert result.exit_code == 1 and "is a file, not a folder" in said(result.stderr)
    monkeypatch.setenv("TRANSFERKIT_HOME", str(home / "below"))
    assert runner.invoke(app, ["cache", "--clear"]).exit_code == 1


def test_the_cache_is_not_cleared_under_a_running_process(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "features").mkdir(parents=True)
    cached = tmp_path / "home" / "features" / ("0" * 24 + ".npz")  # named as the cache names
    cached.write_bytes(b"kept")
    user = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                             "from transferkit.cache import share_cache; share_cache(); "
                             "print('ready', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert user.stdout.readline().strip() == "ready"
        refused = runner.invoke(app, ["cache", "--clear"])
        assert refused.exit_code == 1 and "Another transferkit process is using the cache" \
            in said(refused.stderr)
        assert cached.exists()
    finally:
        user.kill()
        user.wait()
    assert runner.invoke(app, ["cache", "--clear"]).exit_code == 0
    assert not (tmp_path / "home" / "features").exists()


def test_export_creates_missing_parent_folders_as_every_command_does(trained_run: Path,
                                                                    tmp_path: Path):
    target = tmp_path / "new" / "deeper" / "m.tflite"
    result = runner.invoke(app, ["export", str(trained_run), "--format", "tflite", "-o",
                                 str(target), "--check-images", "2"])
    assert result.exit_code == 0, result.output
    assert target.is_file() and (target.parent / "m.tflite.labels.txt").is_file()
    onnx = runner.invoke(app, ["export", str(trained_run), "--format", "onnx", "-o",
                               str(target.with_suffix(".onnx")), "--check-images", "2"])
    assert onnx.exit_code == 0, onnx.output  # beside it, with labels of its own
    assert (target.parent / "m.onnx.labels.txt").is_file()
    assert "FutureWarning" not in onnx.output


def test_unbounded_preview_work_is_refused(image_folder: Path, tmp_path: Path):
    result = runner.invoke(app, ["augment-preview", str(image_folder), "-o",
                                 str(tmp_path / "g.png"), "--variants", "100000"])
    assert result.exit_code == 2 and "--variants must be between 1 and 32" in said(
        result.stderr)


def _signalled_in_the_probe(signum: int):
    """A reporter that sends `signum` when the probe's features are being computed: outside
    the epochs, where StopOnSignal is not listening."""
    class Signaller(Recorder):
        def info(self, message: str) -> None:
            super().info(message)
            if message.startswith("Frozen-base features"):
                os.kill(os.getpid(), signum)
    return Signaller()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_the_epochs_leaves_a_truthful_record(image_folder: Path, tmp_path: Path,
                                                            signum: int):
    from transferkit.commands.finetune import finetune

    run_dir = tmp_path / "run"
    config = FinetuneConfig(adapt=False, patience=0,
                            data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                            output=run_dir, weights="none", base="tiny", finetune_epochs=1)
    with pytest.raises(RunInterrupted, match="before its first checkpoint") as stopped:
        finetune(config, _signalled_in_the_probe(signum))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["stopped"]["phase"] == "the probe"
    assert record["stopped"]["signal"] == signal.Signals(signum).name
    again = runner.invoke(app, ["finetune", str(image_folder), "-o", str(run_dir)])
    assert "interrupted during the probe" in said(again.stderr)
    assert again.exit_code == 1
    # the interrupted run and a second start say the same: --resume starts it again
    advice = f"transferkit finetune --resume {run_dir}"
    assert advice in said(again.stderr) and advice in said(str(stopped.value))
    resumed = runner.invoke(app, ["finetune", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_a_sigterm_inside_a_keras_layer_call_is_recorded_not_a_traceback(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Keras re-raises an exception from a layer call as a new one with its own message, so
    a SIGTERM while a base is being built once reached the user as a traceback and left
    run.json 'running'."""
    import keras

    from transferkit.commands import finetune as recipe

    real = recipe.fit_probe

    class Signalling(keras.layers.Layer):
        def call(self, x):
            os.kill(os.getpid(), signal.SIGTERM)
            return x

    def probe_then_signal(*args, **kwargs):
        probe = real(*args, **kwargs)
        Signalling()(keras.Input((2,)))  # the signal arrives inside a Keras call
        return probe

    monkeypatch.setattr(recipe, "fit_probe", probe_then_signal)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(image_folder), "-o", str(run_dir),
                                 "--base", "tiny", "--weights", "none", "--image-size", "32"])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "SIGTERM" in said(result.stderr) and "Traceback" not in result.output
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


def test_an_error_mid_run_is_recorded_not_left_running(image_folder: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    import errno

    import transferkit.commands.finetune as recipe

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "curves.png")

    monkeypatch.setattr(recipe, "plot_curves", disk_full)
    run_dir = tmp_path / "run"
    config = FinetuneConfig(adapt=False, patience=0,
                            data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                            output=run_dir, weights="none", base="tiny", finetune_epochs=1)
    with pytest.raises(OSError):
        recipe.finetune(config)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "No space left" in record["failure"]
    assert record["stopped"]["epoch"] == 1  # its checkpoint can be resumed
    refused = runner.invoke(app, ["predict", str(run_dir), str(image_folder)])
    assert refused.exit_code == 1 and "--resume" in said(refused.stderr)
    monkeypatch.undo()
    result = recipe.resume_finetune(run_dir)
    assert result.run_dir == run_dir
    done = json.loads((run_dir / "run.json").read_text())
    assert done["status"] == "complete" and done["failure"] is None


def test_a_run_being_written_is_named_as_such_and_refused_at_once(trained_run: Path,
                                                                  image_folder: Path,
                                                                  tmp_path: Path):
    """While one process writes a run, predict says so (not "finish it with --resume"),
    and a second finetune into it is refused before any work."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    values = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**values, "status": "running"}))
    holder = subprocess.Popen([sys.executable, "-c", TINY_SETUP + (
        "import time; from pathlib import Path; "
        "from transferkit.runs.directory import run_lock\n"
        f"with run_lock(Path({str(run_dir)!r})):\n"
        "    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        predicted = runner.invoke(app, ["predict", str(run_dir), str(image_folder)])
        assert predicted.exit_code == 1
        assert "still being written by another transferkit process" in said(predicted.stderr)
        second = runner.invoke(app, ["finetune", str(image_folder), "-o", str(run_dir),
                                     "--overwrite"])
        assert second.exit_code == 1
        assert "is being written by another transferkit process" in said(second.stderr)
    finally:
        holder.kill()
        holder.wait()


def test_unreadable_files_are_described_without_object_reprs(tmp_path: Path):
    from transferkit.data.inspect import inspect_image

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    info = inspect_image(bad)
    assert info.problem is not None and "object at 0x" not in info.problem
    assert "cannot identify image file" in info.problem


def test_a_run_json_of_the_wrong_types_is_damaged_not_a_traceback(trained_run: Path,
                                                                  image_folder: Path,
                                                                  tmp_path: Path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    values = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**values, "image_size": "big"}))
    result = runner.invoke(app, ["predict", str(run_dir), str(image_folder)])
    assert result.exit_code == 1 and "must be a whole number; got 'big'" in said(result.stderr)


def test_a_damaged_model_file_is_named_damaged_not_missing(trained_run: Path,
                                                         image_folder: Path, tmp_path: Path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    model = run_dir / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    result = runner.invoke(app, ["predict", str(run_dir), str(image_folder)])
    assert result.exit_code == 1 and "is damaged: it is not a Keras archive" in said(
        result.stderr)


def test_evaluate_on_the_runs_own_images_does_not_call_them_held_out(trained_run: Path,
                                                                    image_folder: Path,
                                                                    tmp_path: Path):
    import shutil

    copy = tmp_path / "copy"  # the same images under another folder name
    shutil.copytree(image_folder, copy)
    result = runner.invoke(app, ["evaluate", str(trained_run), str(copy), "-o",
                                 str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    text = said(result.stdout + result.stderr)
    assert "held out: nothing was chosen" not in text
    assert "18 of the 18 images" in text and "not held out" in text


def test_json_predictions_carry_names_that_are_not_utf8_losslessly(trained_run: Path,
                                                                   tmp_path: Path):
    import base64

    from conftest import make_image

    folder = tmp_path / "shots"
    folder.mkdir()
    raw = b"caf\xe9 latin-1.png"
    make_image("circles", 3).save(os.fsdecode(os.fsencode(folder) + b"/" + raw))
    make_image("squares", 4).save(folder / "plain.png")
    result = runner.invoke(app, ["predict", str(trained_run), str(folder), "--format", "json",
                                 "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "p.json").read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "\\udc" not in text  # no lone surrogates, which jq and node cannot map back
    rows = {Path(r["path"]).name: r for r in json.loads(text)}
    odd = rows["caf\ufffd latin-1.png"]
    assert base64.b64decode(odd["path_bytes"]).endswith(raw)
    assert "path_bytes" not in rows["plain.png"]


def test_a_resume_records_the_files_that_are_gone(image_folder: Path, tmp_path: Path):
    import shutil

    from transferkit.commands.finetune import finetune, resume_finetune

    class StopAfterFirstEpoch(Recorder):
        def epoch_ended(self, stage, epoch, epochs, metrics):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    run_dir = tmp_path / "run"
    config = FinetuneConfig(adapt=False, patience=0, data=DataConfig(data_dir=data, image_size=32,
                                                         batch_size=8),
                            output=run_dir, weights="none", base="tiny", finetune_epochs=2)
    with pytest.raises(RunInterrupted):
        finetune(config, StopAfterFirstEpoch())
    before = json.loads((run_dir / "run.json").read_text())["data"]
    gone = next(row.split(",")[0] for row in (run_dir / "splits.csv").read_text().splitlines()
                if row.endswith(",train"))
    (data / gone).unlink()
    resume_finetune(run_dir)
    after = json.loads((run_dir / "run.json").read_text())["data"]
    assert sum(after["counts"]["train"].values()) == sum(before["counts"]["train"].values()) - 1
    assert [Path(s["path"]).name for s in after["skipped"]] == [Path(gone).name]


def test_the_old_name_of_an_option_still_works_and_says_the_new_one(image_folder: Path,
                                                                    tmp_path: Path):
    result = runner.invoke(app, ["finetune", str(image_folder), "-o", str(tmp_path / "run"),
                                 "--weights", "none", "--base", "tiny", "--image-size", "32",
                                 "--no-adapt", "--epochs", "1", "--finetune-epochs", "0",
                                 "--no-augment", "--patience", "0"])
    assert result.exit_code == 0, result.output
    assert "--epochs is now --head-epochs" in said(result.stderr)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["epochs"] == 1 and record["stages"][0]["name"] == "head"


def test_finetune_help_shows_the_options_that_matter_and_help_all_the_rest():
    short = runner.invoke(app, ["finetune", "--help"])
    full = runner.invoke(app, ["finetune", "--help-all"])
    assert short.exit_code == full.exit_code == 0
    assert "--head-epochs" in short.output and "--learning-rate" in short.output
    assert "--momentum" not in short.output and "--momentum" in full.output
    def rows(text: str) -> int:  # options listed, one table row each
        return sum(line.lstrip("│ ").startswith("--") for line in text.splitlines())

    assert rows(short.output) < rows(full.output) / 2


def test_calibration_that_val_cannot_inform_is_recorded_and_shown_as_skipped(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import transferkit.commands.finetune as recipe
    from transferkit.runs.directory import read_record

    monkeypatch.setattr(recipe, "fit_temperature", lambda probabilities, labels: None)
    reporter = Recorder()
    recipe.finetune(FinetuneConfig(
        adapt=False, data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
        output=tmp_path / "run", weights="none", base="tiny", finetune_epochs=0), reporter)
    calibration = read_record(tmp_path / "run").calibration
    assert calibration is not None and calibration.skipped and calibration.temperature == 1.0
    assert calibration.val_ece_before == calibration.val_ece_after
    assert any("Calibration skipped" in m for m in reporter.messages)
    assert not any(m.startswith("Calibration: temperature") for m in reporter.messages)
    page = said((tmp_path / "run" / "report.html").read_text())
    assert "skipped (the best temperature on val lies beyond the range tried" in page
    assert "temperature 1.00" not in page


def test_a_temperature_that_would_worsen_calibration_on_val_is_not_applied():
    from transferkit.commands.finetune import _temperature

    probabilities = np.array([[0.32, 0.68], [0.34, 0.66], [0.95, 0.05], [0.69, 0.31]])
    reporter = Recorder()
    temperature, why = _temperature(probabilities, np.zeros(4, int), reporter)
    assert temperature == 1.0 and "would raise its expected calibration error" in why
    assert any("Calibration skipped" in m for m in reporter.messages)
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 0])  # over-confident and often wrong: it helps
    sure = np.array([[0.99, 0.01], [0.02, 0.98]] * 4)
    temperature, why = _temperature(sure, labels, reporter)
    assert temperature > 1.0 and why == ""


def test_no_output_is_written_inside_the_data_folder(image_folder: Path, tmp_path: Path):
    before = sorted(p for p in image_folder.rglob("*"))
    first_class = next(p for p in image_folder.iterdir() if p.is_dir())
    for args in (["finetune", str(image_folder), "-o", str(image_folder), "--overwrite"],
                 ["cv", str(image_folder), "-o", str(first_class / "run")],
                 ["audit", str(image_folder), "-o", str(image_folder / "audit")],
                 ["augment-preview", str(image_folder), "-o", str(first_class / "a.png")]):
        result = runner.invoke(app, [*args, "--base", "tiny"])
        assert result.exit_code == 1, result.output
        assert "inside the data folder" in said(result.stderr), args
    assert sorted(p for p in image_folder.rglob("*")) == before
    linked = tmp_path / "link"
    linked.symlink_to(image_folder)  # the same folder by another name
    result = runner.invoke(app, ["finetune", str(linked), "-o", str(image_folder / "r"),
                                 "--base", "tiny"])
    assert result.exit_code == 1 and "inside the data folder" in said(result.stderr)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_takes_no_files_is_refused_before_any_work(tmp_path: Path):
    from transferkit.files import write_text

    with pytest.raises(ArtifactError, match="Could not create a file in '/proc'"):
        check_new_output(Path("/proc/predictions.csv"), overwrite=False)
    with pytest.raises(ArtifactError, match="Choose another output"):
        write_text(Path("/proc/predictions.csv"), "path\n")


def test_an_accuracy_on_the_runs_own_images_says_it_is_not_held_out(trained_run: Path,
                                                                    image_folder: Path,
                                                                    tmp_path: Path):
    own = runner.invoke(app, ["predict", str(trained_run), str(image_folder), "-o",
                              str(tmp_path / "own.csv")])
    assert own.exit_code == 0, own.output
    assert "18 of them trained the run or chose its model: not held out" in said(own.stderr)
    from conftest import write_class_folder

    new = write_class_folder(tmp_path / "new", per_class=2, offset=700)
    fresh = runner.invoke(app, ["predict", str(trained_run), str(new), "-o",
                                str(tmp_path / "new.csv")])
    assert fresh.exit_code == 0 and "of 6 right among" in fresh.stderr
    assert "not held out" not in said(fresh.stderr)


def test_an_image_beside_the_class_folders_is_reported_not_dropped_silently(tmp_path: Path):
    from conftest import make_image, write_class_folder

    from transferkit.data.folders import load_splits

    root = write_class_folder(tmp_path / "data", per_class=4)
    make_image("circles", 1).save(root / "loose.png")
    (root / "notes.txt").write_text("notes beside the classes are fine")
    reporter = Recorder()
    splits = load_splits(root, 0.2, 0, reporter)
    assert len(splits.train) + len(splits.val) == 12
    assert any("Ignored 1 image(s) outside any class folder" in m and "loose.png" in m
               for m in reporter.warnings)
