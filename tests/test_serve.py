"""transferkit serve, as a real server in a subprocess on a free localhost port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from transferkit.commands.predict import predict
from transferkit.config import PredictConfig

TESTS = Path(__file__).parent
KEY = "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transferkit serve RUN` in a subprocess (the tests' tiny base registered first)."""

    def __init__(self, run: Path, *options: str, env: dict | None = None) -> None:
        self.port = _free_port()
        code = "import tinybase; tinybase.register(); from transferkit.cli.app import main; main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "serve", str(run), "--port", str(self.port), *options],
            env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
            if self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"the server did not start: {self.process.stdout.read()}")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null"), dict(
                response.getheaders())
        finally:
            connection.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds almost none."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(
        b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "tkboundary7"
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"; filename=\"{name}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for i, (name, data) in enumerate(files)) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(trained_run: Path):
    started = Server(trained_run, env={"TRANSFERKIT_API_KEY": KEY})
    yield started
    assert started.stop() == 0


def test_answers_equal_predict_for_the_same_images(server, trained_run, image_folder):
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())[:5]
    body, kind = _multipart([(f.name, f.read_bytes()) for f in files])
    status, rows, _ = server.request("POST", "/predict?top_k=3", body,
                                     {"Content-Type": kind, "X-API-Key": KEY})
    assert status == 200, rows
    expected = predict(PredictConfig(run_dir=trained_run, paths=tuple(files), top_k=3))
    for row, want in zip(rows, expected.predictions, strict=True):
        assert row["path"] == want.path.name and row["label"] == want.label
        for got, ref in zip(row["top_k"], want.top_k, strict=True):
            assert got["label"] == ref[0] and got["probability"] == pytest.approx(ref[1], abs=1e-5)
        assert row["novelty"] == pytest.approx(want.novelty, abs=1e-3)
    raw = server.request("POST", "/predict", files[0].read_bytes(),
                         {"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"})
    assert raw[0] == 200 and raw[1][0]["label"] == expected.predictions[0].label


def test_bad_input_gets_a_4xx_naming_it_and_the_server_keeps_serving(server, image_folder):
    good = next(p for p in image_folder.rglob("*.png")).read_bytes()
    auth = {"X-API-Key": KEY}
    cases = {
        "not an image": (b"hello", "image/png", 422, "unreadable"),
        "truncated": (good[: len(good) // 3], "image/png", 422, "image"),
        "zero bytes": (b"", "image/png", 400, "empty"),
        "wrong content type": (good, "text/plain", 415, "not an image"),
        "decompression bomb": (_png_header(60_000, 60_000), "image/png", 413, "megapixels"),
    }
    for name, (body, kind, status, words) in cases.items():
        got = server.request("POST", "/predict", body, {"Content-Type": kind, **auth})
        assert got[0] == status and words in got[1]["error"], (name, got)
    assert server.request("POST", "/predict?top_k=0", good,
                          {"Content-Type": "image/png", **auth})[0] == 400
    assert server.request("POST", "/predict", good, {"Content-Type": "image/png"})[0] == 401
    assert server.request("POST", "/predict", good, {"Content-Type": "image/png",
                                                      "X-API-Key": "wrong"})[0] == 401
    assert server.request("GET", "/health")[0] == 200  # no key needed to say it is alive
    status, meta, _ = server.request("GET", "/metadata", headers=auth)
    assert status == 200 and len(meta["classes"]) == 3 and meta["image_size"] == 32
    assert server.request("POST", "/predict", good, {"Content-Type": "image/png", **auth})[0] \
        == 200  # still serving


def test_images_beyond_a_full_queue_are_refused_for_now():
    """A request that would fit an emptier queue gets QueueFull (served as 503 with
    Retry-After); one larger than the whole queue is a 413 (above)."""
    import asyncio

    import numpy as np

    from transferkit.commands.serve import Batcher

    async def fill() -> None:
        batcher = Batcher(lambda: None, max_batch=2, max_wait_s=0, max_queue=2)  # no worker
        waiting = asyncio.ensure_future(batcher.submit([np.zeros(1), np.zeros(1)]))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.QueueFull):
            await batcher.submit([np.zeros(1)])
        waiting.cancel()

    asyncio.run(fill())


def test_a_full_queue_answers_503_and_sigterm_drains_the_requests_in_flight(
        trained_run, image_folder):
    server = Server(trained_run, "--max-queue", "2", "--max-batch", "2", "--max-wait-ms", "700",
                    "--max-body-mb", "1")
    try:
        files = [p.read_bytes() for p in sorted(image_folder.rglob("*.png"))[:3]]
        body, kind = _multipart([(f"{i}.png", data) for i, data in enumerate(files)])
        # more images in one request than the queue holds: no retry could help
        status, answer, headers = server.request("POST", "/predict", body, {"Content-Type": kind})
        assert status == 413 and "at most 2" in answer["error"] and "retry-after" not in headers
        too_large = server.request("POST", "/predict", b"x" * (2 * 2**20),
                                   {"Content-Type": "image/png"})
        assert too_large[0] == 413 and "limit" in too_large[1]["error"]
        in_flight: dict = {}

        def send() -> None:
            in_flight["answer"] = server.request("POST", "/predict", files[0],
                                                 {"Content-Type": "image/png"})

        thread = threading.Thread(target=send)
        thread.start()
        time.sleep(0.3)  # the image waits up to 0.7 s for a batch to fill
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert in_flight["answer"][0] == 200 and in_flight["answer"][1][0]["label"]
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()


def test_an_unfinished_run_is_refused_before_serving(tmp_path):
    from typer.testing import CliRunner

    from transferkit.cli.app import app

    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "run"), "--port",
                                      str(_free_port())])
    assert result.exit_code == 1 and "run.json" in result.output


def test_reload_swaps_in_a_newer_model_without_dropping_requests(trained_run, image_folder,
                                                                  tmp_path):
    import shutil

    import keras
    import numpy as np

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = next(p for p in image_folder.rglob("*.png")).read_bytes()
    server = Server(run, "--reload")
    try:
        before = server.request("POST", "/predict?top_k=3", image, {"Content-Type": "image/png"})
        model = keras.models.load_model(run / "model.keras")
        dense = model.get_layer("head").get_layer("predictions")
        kernel, bias = dense.get_weights()
        dense.set_weights([kernel[:, ::-1], bias[::-1]])  # the classes' answers reversed
        model.save(tmp_path / "newer.keras")
        os.replace(tmp_path / "newer.keras", run / "model.keras")
        answers = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answers.append(server.request("POST", "/predict?top_k=3", image,
                                          {"Content-Type": "image/png"}))
            if answers[-1][1] != before[1]:
                break
            time.sleep(0.2)
        assert all(status == 200 for status, *_ in answers)  # none dropped while swapping
        old = {r["label"]: r["probability"] for r in before[1][0]["top_k"]}
        new = {r["label"]: r["probability"] for r in answers[-1][1][0]["top_k"]}
        names = sorted(old)
        assert np.allclose([new[n] for n in names], [old[n] for n in names[::-1]], atol=1e-5)
    finally:
        assert server.stop() == 0
