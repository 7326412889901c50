"""Fine-tuning across workers (--strategy multiworker): TF_CONFIG read and refused, and real
worker processes on 127.0.0.1 training one model: the same weights on every worker, the run
written once by the chief, a lost worker and a signal ending all of them truthfully, and
--resume finishing the run with another worker count."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TINY_SETUP, write_class_folder

from transferkit.config import (
    ComputeConfig,
    CVConfig,
    DataConfig,
    FinetuneConfig,
    OptimizerConfig,
)
from transferkit.errors import ConfigError
from transferkit.workers import Cluster, read_cluster, shard

CLI = TINY_SETUP + "from transferkit.cli.app import app; app()"
TRAIN = ["--base", "tiny", "--weights", "none", "--strategy", "multiworker", "--patience", "0"]


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def test_tf_config_is_read_as_json_and_checked():
    assert read_cluster({}) == Cluster(("localhost",), 0)
    two = read_cluster({"TF_CONFIG": json.dumps({
        "cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}})})
    assert two.index == 1 and two.size == 2 and not two.chief
    with_chief = read_cluster({"TF_CONFIG": json.dumps({
        "cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})})
    assert with_chief.index == 1 and with_chief.workers == ("c:1", "a:1")
    for bad in ("not json", '{"cluster": {"worker": ["a:1"]}}', json.dumps({
            "cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}),
            json.dumps({"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}),
            json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}})):
        with pytest.raises(ConfigError, match="TF_CONFIG does not describe"):
            read_cluster({"TF_CONFIG": bad})
    for blank in ("", "  \n"):  # set but empty: TensorFlow's own reader fails on it
        with pytest.raises(ConfigError, match="set but empty"):
            read_cluster({"TF_CONFIG": blank})
    assert shard(list(range(7)), two) == [1, 3, 5]


def test_what_runs_on_one_machine_only_is_refused_across_workers(tmp_path):
    data = DataConfig(data_dir=tmp_path)
    across = ComputeConfig(strategy="multiworker")
    for given in ({"lr_find": True}, {"optimizer": OptimizerConfig(ema=0.99)},
                  {"base": "auto"}):
        with pytest.raises(ConfigError, match="one machine only"):
            FinetuneConfig(data=data, output=None, compute=across, **given)
    with pytest.raises(ConfigError, match="cv runs its folds on one machine"):
        CVConfig(recipe=FinetuneConfig(data=data, output=None, compute=across))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _workers(args: list[str], logs: Path, scratch: Path, n: int = 2) -> list[subprocess.Popen]:
    """`n` transferkit processes on 127.0.0.1, each told its place by TF_CONFIG; their temp
    folders (the workers' scratch) in `scratch`."""
    ports = _free_ports(n)
    scratch.mkdir(exist_ok=True)
    return [subprocess.Popen(
        [sys.executable, "-c", CLI, *args], stdout=(logs / f"worker{i}.log").open("w"),
        stderr=subprocess.STDOUT, env=dict(os.environ, TF_CONFIG=_tf_config(ports, i),
                                           TMPDIR=str(scratch), COLUMNS="200"))
        for i in range(n)]


def _wait_for(log: Path, text: str, process: subprocess.Popen, limit: float = 120) -> None:
    end = time.monotonic() + limit
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.05)


def _digest(log: Path) -> str:
    found = re.search(r"Stages done on \d+ workers; the weights of .*: ([0-9a-f]{16})\.",
                      log.read_text())
    assert found, log.read_text()[-3000:]
    return found.group(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_folder(tmp_path_factory.mktemp("workers") / "data", per_class=10)


def test_two_workers_train_one_model_that_the_chief_alone_writes(data, tmp_path):
    run = tmp_path / "run"
    # a hidden layer the probe cannot fill: the head trains from scratch, on cached features
    workers = _workers(["finetune", str(data), "-o", str(run), *TRAIN, "--no-augment",
                        "--dense-units", "16", "--learning-rate", "0.01", "--head-epochs", "4",
                        "--finetune-epochs", "2"], tmp_path,
                       tmp_path / "scratch")
    codes = [w.wait(timeout=300) for w in workers]
    chief, other = tmp_path / "worker0.log", tmp_path / "worker1.log"
    assert codes == [0, 0], chief.read_text()[-3000:] + other.read_text()[-3000:]
    assert _digest(chief) == _digest(other)  # the same final weights on both workers
    assert "The chief writes the run to" in other.read_text()
    assert list((tmp_path / "scratch").iterdir()) == []  # the other worker left nothing
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["compute"]["replicas"] == 2
    history = json.loads((run / "history.json").read_text())
    head = [row["loss"] for row in history if row["stage"] == "head"]
    assert len(head) == 4 and head[-1] < head[0]  # the loss fell
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)  # plain Keras
    assert model.output_shape == (None, 3)
    assert np.isfinite(model.predict(np.zeros((1, 32, 32, 3)), verbose=0)).all()


def test_a_lost_worker_ends_the_others_and_resume_finishes_on_one(data, tmp_path):
    run = tmp_path / "run"
    workers = _workers(["finetune", str(data), "-o", str(run), *TRAIN, "--head-epochs", "1",
                        "--finetune-epochs", "30"], tmp_path, tmp_path / "scratch")
    chief = tmp_path / "worker0.log"
    _wait_for(chief, "finetune 4/31", workers[0])
    workers[1].kill()  # mid-epoch
    started = time.monotonic()
    assert workers[0].wait(timeout=60) == 1
    assert time.monotonic() - started < 60
    assert "Another worker stopped answering" in chief.read_text()
    assert "Traceback" not in chief.read_text()
    assert "base_collective_executor" not in chief.read_text()  # TensorFlow's C++ lines
    record = json.loads((run / "run.json").read_text())
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert record["status"] == "interrupted" and record["stopped"]["epoch"] == state["epoch"]
    # one worker now (no TF_CONFIG): the run continues after its checkpoint
    resumed = subprocess.run([sys.executable, "-c", CLI, "finetune", "--resume", str(run)],
                             capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if k != "TF_CONFIG"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"after epoch {state['epoch']}" in resumed.stdout + resumed.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["compute"]["replicas"] == 1  # it finished on one worker, and says so
    epochs = [row["epoch"] for row in json.loads((run / "history.json").read_text())]
    assert epochs == list(range(1, len(epochs) + 1))  # nothing lost or repeated


def test_a_signal_to_one_worker_stops_all_of_them_at_the_same_step(data, tmp_path):
    run = tmp_path / "run"
    workers = _workers(["finetune", str(data), "-o", str(run), *TRAIN, "--head-epochs", "1",
                        "--finetune-epochs", "30"], tmp_path, tmp_path / "scratch")
    _wait_for(tmp_path / "worker0.log", "finetune 3/31", workers[0])
    workers[1].send_signal(signal.SIGTERM)
    assert [w.wait(timeout=60) for w in workers] == [143, 143]
    record = json.loads((run / "run.json").read_text())
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert record["status"] == "interrupted" and record["stopped"]["signal"] == "SIGTERM"
    assert record["stopped"]["epoch"] == state["epoch"]
    other = (tmp_path / "worker1.log").read_text()
    assert f"The chief keeps the run: continue with transferkit finetune --resume {run} on " \
           f"every worker" in " ".join(other.split())
