"""`transferkit serve` under load: a real HTTP client on localhost, side by side in one run.

For a run (Lite0 at 224 px by default: `transferkit finetune sample_data -o RUN`):
1. `predict` on a folder of the same images, timed inside one process after a warm-up: the
   compute floor of this machine (images/s);
2. the server batched (--max-batch 32) and unbatched (--max-batch 1), each at 1, 8 and 64
   concurrent clients for --seconds each: images/s and p50/p99 latency of one-image
   requests;
3. a stress run of --stress-seconds at 64 clients, batched, with 10 % bad requests mixed in
   (not an image, truncated, empty, wrong content type): every status code counted, every
   good answer checked against predict's label, and the server's resident memory sampled
   every second (its growth after the first minute is reported).

    python bench/serve.py RUN --images sample_data --seconds 20 --stress-seconds 120
"""

from __future__ import annotations

import argparse
import collections
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

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(run: Path, *options: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", str(run),
                                "--port", str(port), *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def post(port: int, body: bytes, kind: str) -> tuple[int, bytes, float]:
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
        response = connection.getresponse()
        return response.status, response.read(), time.perf_counter() - began
    finally:
        connection.close()


def load(port: int, clients: int, seconds: float, requests: list[tuple[bytes, str, str | None]]
         ) -> dict:
    """`clients` threads posting one request after another for `seconds`."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    wrong = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        i = index
        while time.perf_counter() < stop:
            body, kind, label = requests[i % len(requests)]
            i += clients
            status, answer, latency = post(port, body, kind)
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(latency)
                    if label is not None and json.loads(answer)[0]["label"] != label:
                        wrong[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "images_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "statuses": dict(statuses), "wrong": wrong[0]}


def predict_floor(run: Path, folder: Path) -> tuple[float, dict[str, str]]:
    """predict's images/s on the folder, after a warm-up, and its label for each file."""
    from transferkit.commands.predict import predict
    from transferkit.config import PredictConfig

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    predict(PredictConfig(run_dir=run, paths=tuple(files[:4])))  # load and trace
    began = time.perf_counter()
    report = predict(PredictConfig(run_dir=run, paths=tuple(files)))
    rate = len(files) / (time.perf_counter() - began)
    return rate, {p.path.name: p.label for p in report.predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=Path, default=Path("sample_data"))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--stress-seconds", type=float, default=120)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    floor, labels = predict_floor(args.run, args.images)
    files = sorted(p for p in args.images.rglob("*") if p.name in labels)
    good = [(f.read_bytes(), "image/jpeg" if f.suffix == ".jpg" else "image/png",
             labels[f.name]) for f in files]
    print(f"predict on a folder of {len(files)} images: {floor:.1f} images/s")
    rows = []
    for name, options in (("batched", ("--max-batch", "32")), ("unbatched", ("--max-batch", "1"))):
        process, port = start(args.run, *options, "--max-queue", "1024")
        for clients in (1, 8, 64):
            row = {"server": name, **load(port, clients, args.seconds, good)}
            rows.append(row)
            print(f"{name:9s} {clients:3d} clients: {row['images_per_s']:6.1f} images/s, p50 "
                  f"{row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms {row['statuses']}",
                  flush=True)
        process.send_signal(signal.SIGTERM)
        process.wait()
    bad = [(b"not an image", "image/png", None), (good[0][0][:300], "image/jpeg", None),
           (b"", "image/png", None), (good[0][0], "text/plain", None)]
    mixed = [r for i, r in enumerate(good) for r in ([r] + ([bad[i % 4]] if i % 9 == 0 else []))]
    process, port = start(args.run, "--max-batch", "32", "--max-queue", "1024")
    memory: list[tuple[float, float]] = []
    sampling = threading.Event()

    def sample() -> None:
        began = time.perf_counter()
        while not sampling.wait(1.0):
            memory.append((time.perf_counter() - began, rss_mb(process.pid)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    stress = load(port, 64, args.stress_seconds, mixed)
    sampling.set()
    sampler.join()
    process.send_signal(signal.SIGTERM)
    code = process.wait()
    after = [m for t, m in memory if t >= 60] or [m for _, m in memory]
    stress.update(bad_share=sum(r[2] is None for r in mixed) / len(mixed),
                  rss_first_minute_mb=after[0], rss_end_mb=after[-1],
                  rss_growth_after_first_minute_mb=after[-1] - after[0], exit_code=code)
    print(f"stress, 64 clients, {args.stress_seconds:.0f} s, {stress['bad_share']:.0%} bad: "
          f"{stress['images_per_s']:.1f} good images/s, statuses {stress['statuses']}, "
          f"{stress['wrong']} wrong answers, RSS {after[0]:.0f} -> {after[-1]:.0f} MB after "
          f"the first minute, exit {code}")
    if args.results:
        args.results.write_text(json.dumps({"predict_floor": floor, "load": rows,
                                            "stress": stress}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
