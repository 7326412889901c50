"""`extract --engine ray` on 1 vs 2 local Ray workers against the local engine, side by side
in one run, and the cost of a worker killed mid-run.

Each Ray run starts its own cluster (`ray start --head --num-cpus N`), extracts every image
of DATA with --no-cache (so everything is computed), and stops it. The killed run kills one
actor process (kill -9) once a third of the 2-worker time has passed; its features must equal
the local run's, with every row once. The sharded run writes three shards (`--shard-rows`),
each its own Ray job. Ray's start-up is outside the timed command; the workers' own start
(TensorFlow, building the base) is inside it.

    python bench/raybatch.py /tmp/tk-data/digits_full
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from serve import free_port  # bench/serve.py, beside this script

from transferkit.feature_files import load_features


def extract(data: Path, out: Path, *engine: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", "extract", str(data), "-o", str(out),
                    "--no-cache", *engine], check=True, capture_output=True)
    return time.perf_counter() - started


def kill_one_worker(after: float, killed: list[int]) -> None:
    """Kills one Ray Data actor process (kill -9) `after` seconds from now."""
    time.sleep(after)
    for pid in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid.isdigit() and b"MapWorker" in command:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
            return


def on_cluster(data: Path, out: Path, cpus: int, *options: str,
               kill_after: float | None = None) -> tuple[float, list[int]]:
    port = free_port()
    subprocess.run(["ray", "start", "--head", f"--num-cpus={cpus}", f"--port={port}",
                    "--include-dashboard=false"], check=True, capture_output=True)
    killed: list[int] = []
    try:
        if kill_after is not None:
            threading.Thread(target=kill_one_worker, args=(kill_after, killed),
                             daemon=True).start()
        seconds = extract(data, out, "--engine", "ray", "--ray-address", "auto", *options)
    finally:
        subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
    return seconds, killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        local = extract(args.data, out / "local.npz")
        reference = np.load(out / "local.npz")
        n = len(reference["paths"])
        print(f"images {n}; local engine: {local:.1f} s, {n / local:.1f} images/s", flush=True)
        two = 0.0
        for cpus in (1, 2):
            seconds, _ = on_cluster(args.data, out / f"ray{cpus}.npz", cpus)
            found = np.load(out / f"ray{cpus}.npz")
            diff = np.abs(found["features"] - reference["features"]).max()
            print(f"ray, {cpus} worker(s): {seconds:.1f} s, {n / seconds:.1f} images/s, "
                  f"max |diff| vs local {diff:.2e}", flush=True)
            two = seconds if cpus == 2 else two
        seconds, killed = on_cluster(args.data, out / "killed.npz", 2, kill_after=two / 3)
        found = np.load(out / "killed.npz")
        same = (found["paths"] == reference["paths"]).all() and len(found["paths"]) == n
        diff = np.abs(found["features"] - reference["features"]).max()
        print(f"ray, 2 workers, one killed (pids {killed}): {seconds:.1f} s "
              f"(+{seconds - two:.1f} s), rows {len(found['paths'])} of {n}, in order: {same}, "
              f"max |diff| {diff:.2e}", flush=True)
        rows = -(-n // 3)
        seconds, _ = on_cluster(args.data, out / "sharded", 2, "--shard-rows", str(rows))
        sharded = load_features(out / "sharded")
        same = (sharded.paths == reference["paths"]).all()
        diff = np.abs(sharded.features - reference["features"]).max()
        print(f"ray, 2 workers, --shard-rows {rows} (3 shards, a Ray job each): {seconds:.1f} "
              f"s (+{seconds - two:.1f} s), same rows in order: {same}, max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
