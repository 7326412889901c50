"""The real app through Typer's CliRunner: exit codes, output and files written."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETUP
from typer.testing import CliRunner

from transferkit.cli.app import app

runner = CliRunner()
LITE0 = ["--weights", "none", "--image-size", "32", "--batch-size", "8"]
TINY = [*LITE0, "--base", "tiny"]  # tests/tinybase.py
TINY_FT = [*TINY, "--no-adapt", "--patience", "0"]  # random weights: not about the data
# checks, nor about stopping early (which skips stages a tiny val split cannot keep)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def said(text: str) -> str:
    """Output with Rich's line wrapping undone, panel borders included."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_finetune_writes_a_self_describing_run(image_folder: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = invoke("finetune", image_folder, "-o", run_dir, *TINY_FT, "--epochs", "2",
                    "--finetune-epochs", "1", "--unfreeze-blocks", "2", "--base", "vgg16",
                    "--brightness-range", "0.8", "1.2")
    assert result.exit_code == 0, result.output
    assert {"model.keras", "run.json", "history.json"} <= {p.name for p in run_dir.iterdir()}
    info = json.loads((run_dir / "run.json").read_text())
    assert info["base"] == "vgg16" and info["config"]["data"]["image_size"] == 32
    assert info["config"]["augment"]["brightness_range"] == [0.8, 1.2]
    assert info["stages"][1]["trainable_params"] > info["stages"][0]["trainable_params"]
    assert "Stage 'head'" in result.stderr and "Stage 'finetune'" in result.stderr
    assert "trainable parameters" in result.stderr
    assert "Training summary" in result.stdout

    again = invoke("finetune", image_folder, "-o", run_dir, *TINY_FT)
    assert again.exit_code == 1
    assert "already exists and is not empty" in said(again.stderr)
    assert "--overwrite" in again.stderr


def test_finetune_head_only(image_folder: Path, tmp_path: Path):
    result = invoke("finetune", image_folder, "-o", tmp_path / "run", *TINY_FT, "--epochs", "1",
                    "--finetune-epochs", "0", "--no-augment")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["name"] for s in info["stages"]] == ["head"]


@pytest.mark.parametrize(("args", "message", "code"), [
    (["--val-split", "1.5"], "--val-split must be strictly between 0 and 1; got 1.5", 2),
    (["--image-size", "16"], "below efficientnet_lite0's minimum of 32", 2),
    (["--weights", "missing.weights.h5"], "is not 'imagenet', 'none' or an existing file", 1),
    (["--unfreeze-blocks", "9"], "efficientnet_lite0 has 8 blocks", 2),
])
def test_finetune_user_errors_without_traceback(image_folder, tmp_path, args, message, code):
    """Usage errors exit 2, other user errors 1."""
    base_args = ["finetune", image_folder, "-o", tmp_path / "run", "--weights", "none",
                 "--image-size", "32", "--epochs", "1"]
    result = invoke(*base_args, *args)
    assert result.exit_code == code, result.output
    assert "Error:" in result.stderr and message in said(result.stderr)
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_and_usage_errors(tmp_path: Path):
    result = invoke("finetune", tmp_path / "nope", "-o", tmp_path / "run")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    usage = invoke("finetune", tmp_path, "-o", tmp_path / "run", "--epochs", "many")
    assert usage.exit_code == 2
    assert invoke("finetune", tmp_path, "-o", tmp_path / "r", "--base", "alexnet").exit_code == 2


def test_extract_then_train_head_then_predict(image_folder: Path, tmp_path: Path):
    features, run_dir = tmp_path / "features.npz", tmp_path / "head_run"
    result = invoke("extract", image_folder, "-o", features, *TINY, "--base", "vgg16",
                    "--blocks", "2", "--train-head", run_dir, "--head-epochs", "2",
                    "--dense-units", "16")
    assert result.exit_code == 0, result.output
    with np.load(features, allow_pickle=False) as npz:
        assert npz["features"].shape == (18, 128)  # vgg16 block2 has 128 channels
        assert sorted(set(npz["splits"].tolist())) == ["train", "val"]
        assert npz["paths"][0].startswith("circles/")
        meta = json.loads(str(npz["meta"]))
    assert meta["blocks"] == 2 and meta["class_names"] == ["circles", "squares", "stripes"]
    assert (run_dir / "splits.csv").read_text().count("\n") == 19  # header + 18 images
    predicted = invoke("predict", run_dir, image_folder / "squares")
    assert predicted.exit_code == 0, predicted.output
    assert "squares_0.jpg" in predicted.stdout and " of 6 right among" in predicted.stderr


def test_extract_refuses_existing_feature_file(image_folder: Path, tmp_path: Path):
    features = tmp_path / "f.npz"
    features.write_bytes(b"precious")
    result = invoke("extract", image_folder, "-o", features, *TINY)
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert features.read_bytes() == b"precious"


def test_predict_table_csv_json_and_bad_files(trained_run: Path, image_folder: Path,
                                              tmp_path: Path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    table = invoke("predict", trained_run, image_folder, bad, "--top-k", "2")
    assert table.exit_code == 0, table.output
    assert "broken.jpg" in table.stdout and "error" in table.stdout
    assert "could not be read" in table.stderr
    assert "of 18 right (accuracy" in said(table.stderr)

    out_csv = tmp_path / "preds.csv"
    result = invoke("predict", trained_run, image_folder, bad, "--output", out_csv,
                    "--top-k", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # results went to the file
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 19
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in ("circles", "squares", "stripes") for r in good)
    assert all(r["true_label"] == Path(r["path"]).parent.name for r in good)
    assert all(float(r["probability"]) >= float(r["probability_2"]) >= float(r["probability_3"])
               for r in good)
    assert [r["path"] for r in rows if r["error"]] == [str(bad)]

    out_json = tmp_path / "preds.json"
    assert invoke("predict", trained_run, image_folder, "-o", out_json).exit_code == 0
    assert len(json.loads(out_json.read_text())) == 18
    again = invoke("predict", trained_run, image_folder, "-o", out_json)
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_predict_with_unreadable_run(tmp_path: Path, image_folder: Path):
    (tmp_path / "run").mkdir()
    result = invoke("predict", tmp_path / "run", image_folder)
    assert result.exit_code == 1 and "has no run.json" in result.stderr
    assert "Traceback" not in result.output


def test_installed_entry_point_answers_help():
    script = Path(sys.executable).with_name("transferkit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "transferkit"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert all(c in done.stdout for c in ("finetune", "extract", "predict"))
    assert "tensorflow" not in done.stderr.lower()


def test_doctor_cli_reports_writes_json_and_quarantines(messy_folder: Path, tmp_path: Path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(messy_folder, data)
    report = tmp_path / "report.json"
    result = invoke("doctor", data, "--output", report, "--quarantine", tmp_path / "bad")
    assert result.exit_code == 1
    assert "truncated image" in result.stdout and "validation leakage" in result.stdout
    assert "CMYK 1" in result.stdout and "Class imbalance (train)" in result.stdout
    assert "Moved 4 unusable file(s)" in said(result.stderr)
    assert {f["kind"] for f in json.loads(report.read_text())["findings"]} >= {
        "empty", "truncated", "unreadable", "not_image", "leak", "conflict", "too_small"}
    assert (tmp_path / "bad" / "train" / "circles" / "notes.jpg").is_file()
    clean = invoke("doctor", Path(__file__).parents[1] / "sample_data")
    assert clean.exit_code == 0 and "No problems found in 90 files" in said(clean.stderr)
    assert "transferkit audit DATA" in said(clean.stderr)  # where the deeper checks are


def test_all_commands_survive_a_messy_folder(messy_folder: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = invoke("finetune", messy_folder, "-o", run_dir, *TINY_FT, "--epochs", "1",
                    "--finetune-epochs", "1")
    assert result.exit_code == 0, result.output
    assert "Skipped 4 file(s)" in result.stderr and "truncated.jpg" in result.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["data"]["skipped"]) == 4 and info["data"]["converted"] == 5
    with open(run_dir / "splits.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {"path": "train/circles/café ünïcode.jpg", "label": "circles",
            "split": "train"} in rows

    extracted = invoke("extract", messy_folder, "-o", tmp_path / "f.npz", *TINY)
    assert extracted.exit_code == 0, extracted.output
    assert "Skipped 4 file(s)" in extracted.stderr

    predicted = invoke("predict", run_dir, messy_folder / "train" / "circles", "-o",
                       tmp_path / "p.json")
    assert predicted.exit_code == 0, predicted.output
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "p.json").read_text())}
    assert rows["truncated.jpg"]["error"].startswith("truncated image")
    assert rows["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert rows["exif6.jpg"]["label"] in ("circles", "squares", "stripes")
    assert "README.txt" not in rows  # folders contribute image files only


def test_interrupted_run_resumes_from_the_cli(image_folder: Path, tmp_path: Path):
    from test_training import SignalAt, _config

    from transferkit.commands.finetune import finetune as run_finetune
    from transferkit.errors import RunInterrupted

    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_finetune(_config(image_folder, run_dir), SignalAt("head", 1))
    again = invoke("finetune", image_folder, "-o", run_dir, *TINY_FT)
    assert again.exit_code == 1 and "--resume" in again.stderr
    assert "interrupted in stage head after epoch 1" in said(again.stderr)
    mixed = invoke("finetune", image_folder, "--resume", run_dir)
    assert mixed.exit_code == 2
    resumed = invoke("finetune", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming stage 'head' after epoch 1" in resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(("setup", "args", "message"), [
    (lambda d: None, [], "Found 0 class folders"),
    (lambda d: (d / "only").mkdir(), [], "Found 1 class folder"),
    (lambda d: [_bad_class(d, "a"), _good_class(d, "b")], [],
     "has no usable images (every file in it is unreadable or not an image)"),
])
def test_data_errors_exit_1_and_write_nothing(tmp_path: Path, setup, args, message):
    data = tmp_path / "data"
    data.mkdir()
    setup(data)
    result = invoke("finetune", data, "-o", tmp_path / "run", *TINY_FT, *args)
    assert result.exit_code == 1, result.output
    assert message in said(result.stderr) and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def _bad_class(root: Path, name: str) -> None:
    (root / name).mkdir()
    (root / name / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")


def _good_class(root: Path, name: str) -> None:
    from conftest import make_image

    (root / name).mkdir()
    for i in range(3):
        make_image("squares", i).save(root / name / f"{i}.png")


def test_weights_that_do_not_fit_exit_1(image_folder: Path, tmp_path: Path):
    from transferkit.bases import build_base, get_base

    weights = tmp_path / "vgg16.weights.h5"
    build_base(get_base("vgg16"), 32, "none").save_weights(weights)
    result = invoke("finetune", image_folder, "-o", tmp_path / "run", "--base", "resnet50",
                    "--weights", weights, "--image-size", "32")
    assert result.exit_code == 1 and "does not fit base 'resnet50'" in said(result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"preprocessing": "caffe"}, "damaged: Setting 'preprocessing' must be a table"),
    ({"class_names": None}, "damaged: Setting 'class_names' must not be null"),
    ({"format_version": 5}, "run format version 5"),  # a later transferkit's
])
def test_predict_refuses_runs_it_cannot_read(trained_run: Path, image_folder: Path,
                                             tmp_path: Path, change, message):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, **change}))
    result = invoke("predict", run_dir, image_folder)
    assert result.exit_code == 1 and message in said(result.stderr)


def _png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_config_file_then_command_line_overrides(image_folder: Path, tmp_path: Path):
    config = tmp_path / "settings.toml"
    config.write_text('base = "vgg16"\nepochs = 1\nfinetune-epochs = 0\ndropout = 0.3\n'
                      'rotation_range = 10\nbrightness_range = [0.9, 1.1]\n'
                      'image_size = 32\nweights = "none"\npatience = 0\n')
    run_dir = tmp_path / "run"
    result = invoke("finetune", image_folder, "-o", run_dir, "--config", config,
                    "--dropout", "0.1", "--tensorboard")
    assert result.exit_code == 0, result.output
    resolved = json.loads((run_dir / "run.json").read_text())["config"]
    assert resolved["base"] == "vgg16" and resolved["epochs"] == 1
    assert resolved["finetune_epochs"] == 0 and resolved["dropout"] == 0.1
    assert resolved["augment"]["rotation_range"] == 10
    assert resolved["augment"]["brightness_range"] == [0.9, 1.1]
    assert resolved["finetune_lr"] is None and resolved["learning_rate"] == 0.001
    assert _png(run_dir / "curves.png")
    assert (run_dir / "history.csv").read_text().startswith("stage,epoch,loss,accuracy")
    assert any((run_dir / "tensorboard").rglob("*tfevents*"))

    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    wrong = invoke("finetune", image_folder, "-o", tmp_path / "r2", "--config", bad)
    assert wrong.exit_code == 2 and "epochz" in wrong.output
    typo = tmp_path / "typo.toml"
    typo.write_text('epochs = "many"\n')
    assert invoke("finetune", image_folder, "-o", tmp_path / "r3", "--config",
                  typo).exit_code == 2


def test_overfit_check_and_lr_find(image_folder: Path, tmp_path: Path):
    check = invoke("finetune", image_folder, *TINY_FT, "--overfit-check", "--base", "resnet50")
    assert check.exit_code == 0, check.output
    assert "Overfit check passed" in said(check.stdout)
    # random Lite0 features at 32 px carry next to no signal: the check must say so
    flat = invoke("finetune", image_folder, *TINY_FT, "--overfit-check")
    assert flat.exit_code == 1 and "Overfit check FAILED" in said(flat.stdout)

    run_dir = tmp_path / "run"
    found = invoke("finetune", image_folder, "-o", run_dir, *TINY_FT, "--lr-find", "--epochs",
                   "1", "--finetune-epochs", "0")
    assert found.exit_code == 0, found.output
    assert "Learning-rate range test" in said(found.stderr)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["plan"]["learning_rate"] == pytest.approx(info["lr_find"]["suggestion"])
    assert info["config"]["learning_rate"] == 1e-3  # as given
    assert _png(run_dir / "lr_find.png")


def test_augment_preview_writes_a_grid(image_folder: Path, tmp_path: Path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = invoke("augment-preview", image_folder, "-o", out, "--images", "3", "--variants",
                    "4", "--image-size", "32")
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.width > im.height > 100  # 5 columns (original + 4 draws) by 3 rows
    assert "3 image(s), each as the original and 4 augmented draws" in said(result.stderr)
    again = invoke("augment-preview", image_folder, "-o", out)
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_cache_command_lists_and_clears(image_folder: Path, tmp_path: Path):
    assert invoke("extract", image_folder, "-o", tmp_path / "f.npz", *TINY).exit_code == 0
    listed = invoke("cache")
    assert listed.exit_code == 0 and "features" in listed.stdout
    cleared = invoke("cache", "--clear")
    assert cleared.exit_code == 0
    row = next(line for line in cleared.stdout.splitlines() if "features" in line)
    assert row.split()[1] == "0"


def test_bases_lists_the_table_and_one_base_in_detail():
    from transferkit.bases import BASES

    listed = invoke("bases")
    assert listed.exit_code == 0
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()
            if line.split() and line.split()[0] in BASES}
    assert set(rows) == set(BASES)
    assert rows["efficientnet_lite0"][-1] == "offline"  # bundled with the install
    assert rows["xception"][1:6] == ["20.9M", "299", "71", "14", "2048"]
    detail = invoke("bases", "resnet50")
    assert detail.exit_code == 0
    assert said(detail.stdout).endswith("1 conv2 2 conv3 3 conv4 4 conv5")
    assert invoke("bases", "vgg99").exit_code == 2


def test_predict_reads_paths_from_stdin_and_writes_jsonl(trained_run: Path, image_folder: Path,
                                                         tmp_path: Path):
    listed = sorted(str(p) for p in (image_folder / "squares").iterdir())[:3]
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", str(trained_run), "-", "-o", str(out), "--tta",
                                 "--threshold", "1.0"], input="\n".join(listed) + "\n\n")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == listed
    assert all(r["label"] == "unknown" and r["best_guess"] for r in rows)
    assert "Test-time augmentation (10 views" in said(result.stderr)
    assert "3 image(s) scored below --threshold 1" in said(result.stderr)
    quoted = invoke("predict", trained_run, str(image_folder / "*" / "*_1.png"))
    assert quoted.exit_code == 0 and said(quoted.stdout).count("_1.png") == 3


NATIVE_LOG = re.compile(r"absl|oneDNN|cuda|cuInit|XNNPACK|TF_ENABLE|^[IWE]\d{4} ", re.I | re.M)


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("transferkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "transferkit"]


def _entry_point_with_tiny() -> list[str]:
    """The command line in a new process that also knows the tests' tiny base."""
    return [sys.executable, "-c", TINY_SETUP + "from transferkit.cli.app import main; main()"]


def test_commands_that_load_tensorflow_start_quiet(trained_run: Path, image_folder: Path,
                                                   tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFERKIT_VERBOSE",
                                                            "TF_CPP_MIN_LOG_LEVEL")}
    predicted = subprocess.run([*_entry_point(), "predict", str(trained_run),
                                str(image_folder / "circles"), "-o", "-"],
                               capture_output=True, text=True, timeout=300, env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert not NATIVE_LOG.search(predicted.stderr), predicted.stderr
    assert predicted.stdout.startswith("path,label,probability")
    exported = subprocess.run([*_entry_point(), "export", str(trained_run), "--format", "tflite",
                               "-o", str(tmp_path / "m.tflite"), "--check-images", "2"],
                              capture_output=True, text=True, timeout=300, env=env)
    assert exported.returncode == 0, exported.stderr
    assert not NATIVE_LOG.search(exported.stderr), exported.stderr
    loud = subprocess.run([*_entry_point(), "--verbose", "predict", str(trained_run),
                           str(image_folder / "circles"), "-o", "-"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 0 and NATIVE_LOG.search(loud.stderr)


FAST_FAIL = """
import sys
from transferkit.cli.app import app
try:
    app(sys.argv[1:], prog_name="transferkit")
    code = 0
except SystemExit as exit:
    code = exit.code
loaded = sorted({"tensorflow", "keras"} & set(sys.modules))
assert not loaded, f"imported {loaded} before failing"
sys.exit(code)
"""


def _one_class(root: Path) -> Path:
    (root / "only" ).mkdir(parents=True)
    return root


@pytest.mark.parametrize(("make_args", "code", "message"), [
    (lambda d, t: ["finetune", t / "missing", "-o", t / "r"], 1, "does not exist"),
    (lambda d, t: ["finetune", _one_class(t / "one"), "-o", t / "r"], 1, "Found 1 class folder"),
    (lambda d, t: ["finetune", d, "-o", t / "r", "--image-size", "8"], 2, "below"),
    (lambda d, t: ["finetune", d, "-o", t / "r", "--image-size", "1000000000"], 2,
     "above transferkit's maximum of 1024 pixels"),
    (lambda d, t: ["finetune", _newline_class(t), "-o", t / "r"], 1, "line break"),
    (lambda d, t: ["finetune", d, "-o", t / "r", "--unfreeze-blocks", "99"], 2, "8 blocks"),
    (lambda d, t: ["finetune", d, "-o", _occupied(t)], 1, "already exists"),
    (lambda d, t: ["finetune", "--resume", t], 1, "is not a transferkit run"),
    (lambda d, t: ["extract", d, "-o", t / "f.npz", "--blocks", "99"], 2, "8 blocks"),
    (lambda d, t: ["predict", t, d], 1, "is not a transferkit run"),
    (lambda d, t: ["evaluate", t / "nope"], 1, "does not exist"),
    (lambda d, t: ["export", t, "--format", "tflite", "-o", t / "m.onnx"], 2, ".tflite"),
    (lambda d, t: ["augment-preview", t / "missing", "-o", t / "g.png"], 1, "does not exist"),
    (lambda d, t: ["augment-preview", d, "-o", t / "g.png", "--rotation-range", "400"], 2,
     "--rotation-range is in degrees"),
    (lambda d, t: ["finetune", d, "-o", t / "r", "--zoom-range", "nan"], 2, "finite"),
])
def test_mistakes_are_reported_before_tensorflow_loads(image_folder: Path, tmp_path: Path,
                                                       make_args, code: int, message: str):
    args = [str(a) for a in make_args(image_folder, tmp_path)]
    done = subprocess.run([sys.executable, "-c", FAST_FAIL, *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert message in said(done.stderr) and "Traceback" not in done.stderr


def _newline_class(root: Path) -> Path:
    for name in ("cats", "dogs\nand wolves"):
        (root / "nl" / name).mkdir(parents=True)
    return root / "nl"


def _occupied(root: Path) -> Path:
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("mine")
    return root / "taken"


def test_predict_writes_any_format_to_stdout_or_a_file(trained_run: Path, image_folder: Path,
                                                       tmp_path: Path):
    lines = invoke("predict", trained_run, image_folder / "squares", "-o", "-", "--format",
                   "jsonl")
    assert lines.exit_code == 0, lines.output
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(rows) == 6 and all(r["true_label"] == "squares" for r in rows)
    piped = invoke("predict", trained_run, image_folder / "squares")  # stdout is no terminal
    assert piped.exit_code == 0
    assert list(csv.DictReader(piped.stdout.splitlines()))[0]["true_label"] == "squares"
    as_json = invoke("predict", trained_run, image_folder / "squares", "-o", "-", "--format",
                     "json")
    assert len(json.loads(as_json.stdout)) == 6
    named = tmp_path / "preds.txt"
    assert invoke("predict", trained_run, image_folder, "-o", named).exit_code == 2
    chosen = invoke("predict", trained_run, image_folder, "-o", named, "--format", "json")
    assert chosen.exit_code == 0 and len(json.loads(named.read_text())) == 18


def test_predict_exits_1_when_nothing_could_be_predicted(trained_run: Path, tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "b.png").write_bytes(b"")
    result = invoke("predict", trained_run, tmp_path / "a.jpg", tmp_path / "b.png")
    assert result.exit_code == 1
    assert "None of the 2 file(s) given could be read" in said(result.stderr)
    assert "Traceback" not in result.output


def test_warnings_never_break_a_path(trained_run: Path, tmp_path: Path):
    deep = tmp_path / ("a-long-folder-name-" * 8) / ("and-a-longer-file-name-" * 6 + ".jpg")
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"broken")
    result = invoke("predict", trained_run, deep)
    assert str(deep) in result.stderr.replace("\n  ", "")  # whole, on one line


def test_evaluate_twice_replaces_the_earlier_evaluation(trained_run: Path, tmp_path: Path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    assert invoke("evaluate", run_dir).exit_code == 0
    (run_dir / "evaluation" / "stale.txt").write_text("from an older evaluation")
    again = invoke("evaluate", run_dir)
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (run_dir / "evaluation").iterdir()) == [
        "confusion.png", "metrics.json", *(["mistakes.png"] if "mistakes" in again.stderr
                                           else [])]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_lr_find_on_the_bundled_sample_data_no_longer_picks_a_diverging_rate(tmp_path: Path):
    """Issue 11's case, with the real Lite0 ImageNet weights: the old rule found its lowest
    loss at lr 1, trained at 0.1 and ended stage 1 at loss 9.6."""
    sample = Path(__file__).parents[1] / "sample_data"
    run_dir = tmp_path / "run"
    result = invoke("finetune", sample, "-o", run_dir, "--lr-find", "--epochs", "2",
                    "--finetune-epochs", "0", "--image-size", "96")
    assert result.exit_code == 0, result.output
    record = json.loads((run_dir / "run.json").read_text())
    found = record["lr_find"]
    assert found["rule"] == "valley" and found["suggestion"] < 0.01
    if found["at_edge"]:
        assert "lowest at the top of the range" in said(result.stderr)
    history = json.loads((run_dir / "history.json").read_text())
    assert history[-1]["loss"] < 1.3  # the default rate's loss in the issue


def test_augmentation_options_are_declared_once_for_both_commands():
    import dataclasses

    from transferkit.config import AugmentConfig

    for command, flag in (("finetune", "--help-all"), ("augment-preview", "--help")):
        shown = said(invoke(command, flag).stdout)  # finetune lists them among the advanced
        for field in dataclasses.fields(AugmentConfig):
            assert field.metadata["help"] in shown, (command, field.name)
    flags = invoke("augment-preview", "--help").stdout
    assert "--augment" in flags and "--no-augment" in flags and "--brightness-range" in flags


def _hostile_folder(root: Path) -> Path:
    """Class folders holding what a careless or hostile user leaves in them."""
    from conftest import write_class_folder

    write_class_folder(root, per_class=5)
    circles = root / "circles"
    os.mkfifo(circles / "fifo.jpg")  # reading it would block forever
    (circles / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    (circles / "loop.jpg").symlink_to(circles / "loop.jpg")
    (circles / "gone.jpg").symlink_to(root / "nowhere.jpg")
    from PIL import Image

    Image.new("L", (9000, 9000)).save(circles / "huge.png")  # 81 MP, a few KB of PNG
    raw = os.fsencode(circles) + b"/caf\xe9 latin-1 name.png"  # not valid UTF-8
    with open(raw, "wb") as f:
        f.write((root / "squares" / "squares_1.png").read_bytes())
    return root


def test_hostile_files_are_skipped_and_reported_never_hang(tmp_path: Path):
    data = _hostile_folder(tmp_path / "data")
    env = {**os.environ, "COLUMNS": "200"}
    doctor = subprocess.run([*_entry_point(), "doctor", str(data), "-o",
                             str(tmp_path / "report.json")], capture_output=True, timeout=120,
                            env=env)
    assert doctor.returncode == 1, doctor.stderr  # problems found, none fatal
    from transferkit.files import restore_names

    report = restore_names(json.loads((tmp_path / "report.json").read_text(encoding="utf-8")))
    kinds = {Path(f["paths"][0]).name: f["kind"] for f in report["findings"] if f["paths"]}
    assert kinds["fifo.jpg"] == kinds["zero.png"] == "special"
    assert kinds["loop.jpg"] == kinds["gone.jpg"] == "unreadable"
    assert kinds["huge.png"] == "too_large"
    assert os.fsencode("caf\udce9 latin-1 name.png") == b"caf\xe9 latin-1 name.png"
    assert "caf\udce9 latin-1 name.png" in {Path(p).name for f in report["findings"]
                                            for p in f["paths"]}  # a duplicate of squares_1

    run_dir = tmp_path / "run"
    trained = subprocess.run([*_entry_point_with_tiny(), "finetune", str(data), "-o",
                              str(run_dir), *TINY, "--epochs", "1", "--finetune-epochs", "0",
                              "--no-augment"],
                             capture_output=True, timeout=300, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    skipped = {Path(s["path"]).name for s in json.loads(
        (run_dir / "run.json").read_text())["data"]["skipped"]}
    assert skipped == {"fifo.jpg", "zero.png", "loop.jpg", "gone.jpg", "huge.png"}
    assert b"caf\xe9 latin-1 name.png" in (run_dir / "splits.csv").read_bytes()

    predicted = subprocess.run([*_entry_point(), "predict", str(run_dir), str(data / "circles"),
                                "-o", "-"], capture_output=True, timeout=300, env=env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert b"caf\xe9 latin-1 name.png" in predicted.stdout  # the name's own bytes
    assert b"fifo.jpg" in predicted.stdout and b"not a regular file" in predicted.stdout


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mounts small tmpfs file systems (root only, as in CI); skips where mounting is denied."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_is_one_error_line_and_keeps_earlier_outputs(trained_run: Path,
                                                                 image_folder: Path, tmpfs):
    disk = tmpfs("small", "size=64k")
    earlier = disk / "preds.json"
    earlier.write_text("earlier predictions")
    with open(disk / "filler", "wb") as f:  # leave less room than the predictions need
        f.write(b"\0" * (60 * 1024))
    result = invoke("predict", trained_run, image_folder, "-o", earlier, "--overwrite")
    assert result.exit_code == 1, result.output
    assert "the disk is full" in said(result.stderr) and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert earlier.read_text() == "earlier predictions"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "preds.json"]  # no temp file


def test_a_read_only_output_is_refused_before_any_work(trained_run: Path, image_folder: Path,
                                                       tmpfs):
    frozen = tmpfs("ro", "ro,size=64k")
    for args in (["predict", trained_run, image_folder, "-o", frozen / "p.csv"],
                 ["finetune", image_folder, "-o", frozen / "run", *TINY_FT],
                 ["export", trained_run, "--format", "tflite", "-o", frozen / "m.tflite"]):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert "Cannot write into" in said(result.stderr) and "read-only" in result.stderr


def test_names_read_from_stdin_keep_their_spaces(trained_run: Path, image_folder: Path,
                                                 tmp_path: Path):
    import shutil

    spaced = [tmp_path / "ends with a space .png", tmp_path / " starts with one.png"]
    for target in spaced:
        shutil.copy(image_folder / "circles" / "circles_1.png", target)
    result = runner.invoke(app, ["predict", str(trained_run), "-", "-o", "-", "--format",
                                 "jsonl"], input="".join(f"{p}\n" for p in spaced))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in spaced]
    assert all(r["error"] is None for r in rows)


def test_resume_refuses_options_it_would_ignore(trained_run: Path):
    result = invoke("finetune", "--resume", trained_run, "--finetune-epochs", "3",
                    "--learning-rate", "0.5")
    assert result.exit_code == 2
    assert "--finetune-epochs, --learning-rate too" in said(result.stderr)


def test_every_command_takes_a_config_file_of_its_own_settings(image_folder: Path,
                                                              tmp_path: Path):
    settings = tmp_path / "predict.toml"
    settings.write_text("top_k = 0\n")  # predict's own setting, out of range: validated
    result = invoke("predict", tmp_path, image_folder, "--config", settings)
    assert result.exit_code == 2 and "--top-k must be at least 1" in said(result.stderr)
    settings.write_text("learning_rate = 0.1\n")  # not a setting predict has
    result = invoke("predict", tmp_path, image_folder, "--config", settings)
    assert result.exit_code == 2 and "unknown setting(s) learning_rate" in said(result.stderr)
