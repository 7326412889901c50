"""Fine-tuning on 1 vs 2 workers (--strategy multiworker), side by side in one run, and a
paper estimate of the speed-up on N machines.

Both runs take the same data, seed and epochs (--patience 0: no early end), so their times
and test scores compare: one process with --strategy none, then two worker processes on
127.0.0.1 with TF_CONFIG (on one machine they share its cores, so this measures the
overhead, not a speed-up). From the one-worker run's seconds per step and the trainable
weights of the fine-tuning stage, the estimate for N machines with a link of --gbits:
each step's compute stays (the batch is per replica), the steps per epoch fall N-fold, and
a ring all-reduce moves 2 (N-1)/N x 4 bytes x the trainable weights per step; the rest of
the run (reading, the probe, the checks, the choice) stays on the chief (Amdahl).

    python bench/workers.py /tmp/tk-data/tuxpaint10 --finetune-epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve import free_port  # bench/serve.py, beside this script


def finetune(data: Path, run: Path, workers: int, options: list[str]) -> float:
    """Seconds for a finetune on `workers` processes (1: --strategy none)."""
    args = [sys.executable, "-m", "transferkit", "finetune", str(data), "-o", str(run),
            "--patience", "0", *options]
    started = time.perf_counter()
    if workers == 1:
        subprocess.run([*args, "--strategy", "none"], check=True, capture_output=True)
        return time.perf_counter() - started
    ports = [free_port() for _ in range(workers)]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = [subprocess.Popen(
        [*args, "--strategy", "multiworker"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(workers)]
    codes = [p.wait() for p in processes]
    if codes != [0] * workers:
        raise SystemExit(f"workers exited {codes}")
    return time.perf_counter() - started


def summary(run: Path, seconds: float) -> dict:
    record = json.loads((run / "run.json").read_text())
    history = json.loads((run / "history.json").read_text())
    tuned = [r for r in history if r["stage"] == "finetune"]
    test = next((s for s in record["scores"] if s["split"] == "test"), None)
    return {"seconds": round(seconds, 1),
            "stages_s": round(sum(r["seconds"] for r in history), 1),
            "finetune_epoch_s": round(sum(r["seconds"] for r in tuned) / max(len(tuned), 1), 1),
            "finetune_val_acc": max((r["val_accuracy"] for r in tuned), default=None),
            "kept": record["kept_stage"], "test": test and test["accuracy"],
            "trainable": record["trainable_params"].get("finetune"),
            "train_images": sum(record["data"]["counts"]["train"].values()),
            "batch": record["config"]["data"]["batch_size"]}


def estimate(one: dict, gbits: float, machines: tuple[int, ...]) -> list[dict]:
    steps = -(-one["train_images"] // one["batch"])
    step_s = one["finetune_epoch_s"] / steps
    rows = []
    for n in machines:
        volume = 2 * (n - 1) / n * 4 * one["trainable"]  # bytes per step, ring all-reduce
        reduce_s = volume * 8 / (gbits * 1e9)
        stages = one["stages_s"] * (step_s + reduce_s) / step_s / n
        fixed = one["seconds"] - one["stages_s"]  # reading, probe, checks, choice: the chief's
        rows.append({"machines": n, "step_s": round(step_s + reduce_s, 3),
                     "allreduce_MB": round(volume / 1e6, 1),
                     "stage_speedup": round(n * step_s / (step_s + reduce_s), 2),
                     "run_speedup": round(one["seconds"] / (fixed + stages), 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--finetune-epochs", default="3")
    parser.add_argument("--head-epochs", default="0")
    parser.add_argument("--gbits", type=float, default=10.0)
    args = parser.parse_args()
    options = ["--finetune-epochs", args.finetune_epochs, "--head-epochs", args.head_epochs]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for workers in (1, 2):
            run = Path(folder) / f"run{workers}"
            results[workers] = summary(run, finetune(args.data, run, workers, options))
            print(f"{workers} worker(s): {results[workers]}", flush=True)
    for row in estimate(results[1], args.gbits, (1, 2, 4, 8, 16)):
        print(f"estimate at {args.gbits:g} Gbit/s: {row}")


if __name__ == "__main__":
    main()
