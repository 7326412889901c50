"""Run directories: one typed record, plain-Keras models, damage reported clearly."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETUP
from PIL import Image

from transferkit.errors import ArtifactError
from transferkit.runs.directory import RECORD_FILE, load_run, read_record
from transferkit.runs.records import RunRecord


def test_run_round_trip(trained_run: Path):
    run = load_run(trained_run)
    assert run.class_names == ("circles", "squares", "stripes") and run.image_size == 32
    record = run.record
    assert [s.name for s in record.stages] == ["head", "finetune"]
    assert record.stages[1].trainable_params > record.stages[0].trainable_params
    assert record.preprocessing.channel_order == "rgb" and record.status == "complete"
    assert {"tensorflow", "keras", "transferkit"} <= set(record.versions)
    assert RunRecord.from_dict(record.to_dict()) == record
    history = json.loads((trained_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["seconds"] > 0 for row in history)
    assert (trained_run / "history.csv").read_text().splitlines()[0].endswith(",seconds")
    assert not list(trained_run.glob(".*tmp*"))  # no temp files left behind


def test_run_json_keeps_the_settings_as_given_and_the_decisions_apart(trained_run: Path):
    values = json.loads((trained_run / RECORD_FILE).read_text())
    assert values["format_version"] == 4
    assert values["image_size"] == 32 and values["config"]["data"]["image_size"] == 32
    assert values["config"]["finetune_lr"] is None  # as given: a tenth of the rate
    assert values["plan"]["finetune_lr"] == pytest.approx(1e-4)  # as decided
    assert values["plan"]["unfreeze_blocks"] == 2


def test_the_final_model_carries_no_optimizer_but_checkpoints_do(trained_run: Path):
    import h5py

    def weight_groups(path: Path) -> set[str]:
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as f, \
                h5py.File(f, "r") as h5:
            return set(h5.keys())

    assert "optimizer" not in weight_groups(trained_run / "model.keras")
    assert "optimizer" in weight_groups(trained_run / "checkpoints" / "best-finetune.keras")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "run.json").unlink(), "has no run.json"),
    (lambda d: (d / "run.json").write_text("{not json"), "Could not read"),
    (lambda d: (d / "model.keras").unlink(), "its model.keras is gone"),
    (lambda d: (d / "model.keras").write_bytes(b"garbage"), "damaged: it is not a Keras"),
    (lambda d: _edit(d, format_version=99), "run format version 99"),
    (lambda d: _edit(d, class_names="cats"), "damaged"),
    (lambda d: _edit(d, class_names=["a", "a", "b"]), "damaged: class_names"),
    (lambda d: _edit(d, class_names=["circles", "squa\nres", "stripes"]), "line breaks"),
    (lambda d: _edit(d, class_names=["circles", "squa\u2028res", "stripes"]), "line breaks"),
    (lambda d: _edit(d, class_names=["a", "b"]), "predicts 3 classes"),
    (lambda d: _edit(d, status="done"), "damaged: status"),
    (lambda d: _edit(d, command="train"), "damaged: unknown command"),
])
def test_damaged_run_directories_fail_clearly(trained_run: Path, tmp_path: Path, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    damage(run_dir)
    with pytest.raises(ArtifactError, match=message):
        load_run(run_dir)


def _edit(run_dir: Path, **changes) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, **changes}))


def test_a_run_from_transferkit_0_1_gets_a_way_forward(trained_run: Path, tmp_path: Path):
    run_dir = tmp_path / "old"
    shutil.copytree(trained_run, run_dir)
    _edit(run_dir, format_version=1, image_size=32)
    with pytest.raises(ArtifactError, match=r"transferkit 0\.1 \(run format 1\).*transferkit "
                                            r"upgrade"):
        read_record(run_dir)


def test_missing_run_directory(tmp_path: Path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_run(tmp_path / "nope")


PLAIN_KERAS = """
import sys
import numpy as np
import keras
from PIL import Image
model = keras.models.load_model(sys.argv[1])  # safe_mode is on by default
images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in sys.argv[3:]])
np.save(sys.argv[2], model.predict(images, verbose=0))
assert not any(name.split(".")[0] == "transferkit" for name in sys.modules), "imported!"
"""


@pytest.fixture(scope="module")
def vgg16_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Caffe-style (BGR, mean-centred) base: its channel flip must be plain Keras too."""
    from transferkit.commands.extract import extract
    from transferkit.config import DataConfig, ExtractConfig, HeadConfig

    work = tmp_path_factory.mktemp("vgg16")
    extract(ExtractConfig(data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                          output=work / "f.npz", base="vgg16", weights="none",
                          head=HeadConfig(output=work / "run", epochs=2)))
    return work / "run"


@pytest.mark.parametrize("which", ["lite0", "vgg16"])
def test_models_load_in_plain_keras_and_agree_with_predict(
        which: str, trained_run: Path, vgg16_run: Path, tmp_path: Path):
    from transferkit.commands.predict import predict
    from transferkit.config import PredictConfig

    run_dir = trained_run if which == "lite0" else vgg16_run
    rng = np.random.default_rng(7)
    files = []
    for i in range(4):  # raw RGB at the run's size: no resize on either side
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    out = tmp_path / "plain.npy"
    env = {"PATH": "/usr/bin:/bin", "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(run_dir / "model.keras"),
                           str(out), *files], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = np.load(out)
    report = predict(PredictConfig(run_dir=run_dir, paths=tuple(Path(f) for f in files),
                                   top_k=3))
    names = load_run(run_dir).class_names
    ours = np.array([[dict(p.top_k)[n] for n in names] for p in report.predictions])
    np.testing.assert_allclose(plain, ours, atol=1e-5)


HOLD_LOCK = """
import sys
from pathlib import Path
from transferkit.runs.directory import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until told (or killed)
"""


def test_one_writer_per_run_directory_and_a_dead_holder_frees_it(tmp_path: Path):
    import os
    import signal

    from transferkit.runs.directory import LOCK_FILE, check_run_output, run_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArtifactError, match=rf"another transferkit process \(process "
                                                rf"{holder.pid} on "), run_lock(run_dir):
            pass
        with pytest.raises(ArtifactError, match="is being written by another"):
            # refused at once, before any work
            check_run_output(run_dir, True, tmp_path / "data", "finetune")
        os.kill(holder.pid, signal.SIGKILL)  # a stale lock: its process is gone
        holder.wait(timeout=30)
        # the lock file alone is not a run
        check_run_output(run_dir, False, tmp_path / "data", "finetune")
        with run_lock(run_dir):
            assert (run_dir / LOCK_FILE).read_text().startswith(f"process {os.getpid()} ")
        assert not run_dir.exists() or not any(run_dir.iterdir())
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_two_finetune_runs_into_one_folder_one_is_refused(image_folder: Path, tmp_path: Path):
    """The real thing: two finetune processes started together; exactly one writes the run."""
    script = TINY_SETUP + (
        "from pathlib import Path; "
        "from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig; "
        "from transferkit.commands.finetune import finetune; "
        "finetune(FinetuneConfig(adapt=False, patience=0, "
        "data=DataConfig(data_dir=Path(sys.argv[1]), image_size=32, batch_size=8), "
        "output=Path(sys.argv[2]), weights='none', base='tiny', epochs=2, finetune_epochs=0, "
        "augment=AugmentConfig(enabled=False)))")
    run_dir = tmp_path / "run"
    both = [subprocess.Popen([sys.executable, "-c", script, str(image_folder), str(run_dir)],
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in both]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code != 0]
    assert codes[0] == 0 and len(refused) == 1, results
    assert "is being written by another transferkit process" in refused[0] or \
        "already exists" in refused[0]
    assert read_record(run_dir).status == "complete"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: _replace_in(d / "splits.csv", ",circles,", ",cats,"),
     r"line \d+ has label 'cats', which is not one of the run's classes"),
    (lambda d: (d / "splits.csv").write_bytes(b"path,label,split\n\x00\xff\xfe\x00junk\n"),
     "is damaged"),
    (lambda d: _replace_in(d / "splits.csv", ",val\n", ",holdout\n"), "has split 'holdout'"),
    (lambda d: _replace_in(d / "splits.csv", "circles/", "../../etc/"), "not inside the data"),
])
def test_damaged_splits_are_reported_not_tracebacks(trained_run: Path, tmp_path: Path,
                                                     damage, message):
    from transferkit.commands.evaluate import evaluate
    from transferkit.config import EvaluateConfig

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    damage(run_dir)
    with pytest.raises(ArtifactError, match=message):
        evaluate(EvaluateConfig(run_dir=run_dir))


def _replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("state", [
    {"stage": "head", "history": []}, {"stage": "head", "epoch": "2", "history": []},
    {"stage": "warmup", "epoch": 1, "history": [{"stage": "warmup", "epoch": 1}]},
    {"stage": "head", "epoch": 3, "history": [{"stage": "head", "epoch": 1}]}, [1, 2]])
def test_a_damaged_resume_state_is_reported(trained_run: Path, tmp_path: Path, state):
    from transferkit.runs.checkpoints import load_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(trained_run / "model.keras", folder / "last.keras")
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="state.json' is damaged"):
        load_checkpoint(tmp_path / "run", ["head", "finetune"])


def test_temp_files_of_a_killed_writer_are_removed_when_the_run_is_next_locked(tmp_path: Path):
    from transferkit.runs.directory import run_lock

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / ".model.keras.0badf00d.tmp.keras",
             run_dir / "checkpoints" / ".last.keras.12345678.tmp.keras"]
    for path in stale:
        path.write_bytes(b"")  # a save killed half-way
    (run_dir / ".notes.tmp").write_text("the user's own file")
    with run_lock(run_dir):
        assert not any(p.exists() for p in stale)
    assert (run_dir / ".notes.tmp").exists()


def test_a_signal_during_the_final_save_waits_for_it(image_folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    import os
    import signal

    import transferkit.runs.directory as runs
    from transferkit.commands.finetune import finetune
    from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig
    from transferkit.reporting import NullReporter

    class Warnings(NullReporter):
        said: list[str] = []

        def warning(self, message: str) -> None:
            self.said.append(message)

    real = runs.save_model

    def save_then_terminated(path, model):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-save
        real(path, model)

    monkeypatch.setattr(runs, "save_model", save_then_terminated)
    run_dir = tmp_path / "run"
    reporter = Warnings()
    finetune(FinetuneConfig(adapt=False, patience=0,
                            data=DataConfig(data_dir=image_folder, image_size=32, batch_size=8),
                            output=run_dir, weights="none", base="tiny", epochs=1,
                            finetune_epochs=0, augment=AugmentConfig(enabled=False)), reporter)
    assert read_record(run_dir).status == "complete"
    assert load_run(run_dir).model is not None
    assert any("SIGTERM arrived while the run was being saved" in m for m in reporter.said)
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


def _as_transferkit_0_1_run(trained_run: Path, run_dir: Path) -> None:
    """A run as transferkit 0.1 wrote it: its own preprocessing layer in model.keras, and
    run.json of format 1 (image size at the top, config's left null, `class_weight`)."""
    import keras

    from transferkit.commands.upgrade import LegacyImagePreprocessing

    shutil.copytree(trained_run, run_dir)
    new = load_run(run_dir)
    pre = new.record.preprocessing
    features = new.model.get_layer("features")
    inputs = keras.Input((32, 32, 3))
    x = LegacyImagePreprocessing(pre.channel_order, pre.mean, pre.std,
                                 name="preprocessing")(inputs)
    x = features.get_layer(new.record.base_layer)(x, training=False)
    old_features = keras.Model(inputs, features.get_layer("pooling")(x), name="features")
    image = keras.Input((32, 32, 3))
    old = keras.Model(image, new.model.get_layer("head")(old_features(image)), name="classifier")
    (run_dir / "model.keras").unlink()
    old.save(run_dir / "model.keras")
    values = json.loads((run_dir / "run.json").read_text())
    values["config"]["data"]["image_size"] = None
    values |= {"format_version": 1, "class_weight": values.pop("plan")["class_weights"]}
    for key in ("failure", "lr_find"):
        values.pop(key)
    (run_dir / "run.json").write_text(json.dumps(values))


def test_upgrade_re_saves_a_transferkit_0_1_run_as_plain_keras(trained_run: Path,
                                                               tmp_path: Path):
    from typer.testing import CliRunner

    from transferkit.cli.app import app

    run_dir = tmp_path / "old"
    _as_transferkit_0_1_run(trained_run, run_dir)
    refused = CliRunner().invoke(app, ["predict", str(run_dir), str(tmp_path)])
    assert refused.exit_code == 1 and "transferkit upgrade" in " ".join(refused.stderr.split())
    images = np.random.default_rng(3).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = load_run(trained_run).model.predict(images, verbose=0)
    upgraded = CliRunner().invoke(app, ["upgrade", str(run_dir)])
    assert upgraded.exit_code == 0, upgraded.output
    record = read_record(run_dir)
    assert record.image_size == 32 and record.class_names == ("circles", "squares", "stripes")
    np.testing.assert_allclose(load_run(run_dir).model.predict(images, verbose=0), expected,
                               atol=1e-5)
    assert "ImagePreprocessing" not in zipfile.ZipFile(run_dir / "model.keras").read(
        "config.json").decode()  # plain Keras now
    again = CliRunner().invoke(app, ["upgrade", str(run_dir)])
    assert again.exit_code == 1 and "nothing to upgrade" in again.stderr


def test_upgrade_brings_a_format_2_run_up_to_date(trained_run: Path, tmp_path: Path):
    """Format 2 kept the resolved values in the config; upgrade takes the image size and
    the plan from them, and changes nothing else."""
    import shutil

    from typer.testing import CliRunner

    from transferkit.cli.app import app

    run_dir = tmp_path / "v2"
    shutil.copytree(trained_run, run_dir)
    current = json.loads((run_dir / "run.json").read_text())
    plan = current["plan"]
    old = {k: v for k, v in current.items() if k not in ("plan", "image_size")}
    old["config"] = {**old["config"], "data": {**old["config"]["data"], "image_size": 32},
                     "finetune_lr": plan["finetune_lr"], "unfreeze_blocks": 2,
                     "augment": plan["augment"]}
    old |= {"format_version": 2, "class_weights": plan["class_weights"]}
    (run_dir / "run.json").write_text(json.dumps(old))
    refused = CliRunner().invoke(app, ["predict", str(run_dir), str(tmp_path)])
    assert refused.exit_code == 1 and "transferkit upgrade" in " ".join(refused.stderr.split())
    upgraded = CliRunner().invoke(app, ["upgrade", str(run_dir)])
    assert upgraded.exit_code == 0 and "from run format 2 to 4" in upgraded.stdout
    record = read_record(run_dir)
    assert record.image_size == 32 and record.plan is not None
    assert json.loads(json.dumps(dataclasses.asdict(record.plan))) == plan
    assert (run_dir / "model.keras").read_bytes() == (trained_run / "model.keras").read_bytes()
