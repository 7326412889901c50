"""ONNX Runtime against TensorFlow under the forward passes that do not train, side by side
in one run on this machine (issue 36):

1. the floor: ../shared/bench/floor.py (Lite0 at 224 px, in-memory batches of 32, tf and ort);
2. extract: Lite0's features of a folder of images, read from files, in this process: the
   first pass (with an empty graph cache, so ONNX's includes converting) and a second one;
3. predict: `transferkit predict RUN FOLDER` as a user runs it (a process each; wall time,
   first with an empty graph cache, then cached), and predict's images/s inside one process
   after a warm-up;
4. serve: `transferkit serve RUN` at 64 concurrent one-image clients (bench/serve.py's load)
   for --seconds: images/s, p50 and p99;
5. with --finetune DATA...: a default `transferkit finetune DATA` with an empty cache
   (features, graphs) per runtime: wall time and test accuracy.

    python bench/runtime.py RUN --images FOLDER_OF_1000 [--finetune /tmp/tk-data/tuxpaint10]
    python bench/runtime.py RUN --images X --only-finetune --probe-only --finetune DATA
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOOR = HERE.parent.parent / "shared" / "bench" / "floor.py"
RUNTIMES = ("tf", "onnx")


def floor() -> dict[str, float]:
    out = subprocess.run([sys.executable, str(FLOOR), "224"], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"tf ([\d.]+) img/s, ort ([\d.]+) img/s", out)
    return {"tf": float(found[1]), "onnx": float(found[2])}


def extract_rates(files: list[str]) -> dict[str, list[float]]:
    """Images/s of Lite0's features over `files`, twice per runtime, in this process."""
    from transferkit.features import FeatureModel, predict_features
    from transferkit.reporting import NullReporter

    rates = {}
    for runtime in RUNTIMES:
        os.environ["TRANSFERKIT_RUNTIME"] = runtime
        model = FeatureModel("efficientnet_lite0", "imagenet", 0, 224, "float32", 8).build()
        rates[runtime] = []
        for _ in range(2):
            began = time.perf_counter()
            predict_features(model, files, 224, 32, NullReporter(), "bench")
            rates[runtime].append(len(files) / (time.perf_counter() - began))
    return rates


def predict_runs(run: Path, folder: Path, work: Path) -> dict[str, list[float]]:
    """Wall seconds of `transferkit predict` per runtime: with an empty graph cache, then
    with the graph cached."""
    walls = {}
    for runtime in RUNTIMES:
        walls[runtime] = []
        for attempt in range(2):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "transferkit", "predict", str(run),
                            str(folder), "-o", str(work / f"{runtime}{attempt}.csv"),
                            "--runtime", runtime, "--overwrite"], check=True,
                           capture_output=True)
            walls[runtime].append(time.perf_counter() - began)
    return walls


def predict_rate(run: Path, folder: Path) -> dict[str, float]:
    from transferkit.commands.predict import predict
    from transferkit.config import PredictConfig

    files = tuple(sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png")))
    rates = {}
    for runtime in RUNTIMES:
        os.environ["TRANSFERKIT_RUNTIME"] = runtime
        predict(PredictConfig(run_dir=run, paths=files))  # load, convert or trace, warm up
        began = time.perf_counter()
        predict(PredictConfig(run_dir=run, paths=files))
        rates[runtime] = len(files) / (time.perf_counter() - began)
    return rates


def serve_load(run: Path, folder: Path, seconds: float) -> dict[str, dict]:
    import signal

    sys.path.insert(0, str(HERE))
    from serve import load, start  # bench/serve.py

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:200]
    good = [(f.read_bytes(), "image/jpeg" if f.suffix == ".jpg" else "image/png", None)
            for f in files]
    rows = {}
    for runtime in RUNTIMES:
        process, port = start(run, "--max-batch", "32", "--max-queue", "1024",
                              "--runtime", runtime)
        load(port, 8, 3, good)  # warm up
        rows[runtime] = load(port, 64, seconds, good)
        process.send_signal(signal.SIGTERM)
        process.wait()
    return rows


def finetune(data: Path, work: Path, options: list[str]) -> dict[str, dict]:
    rows = {}
    for runtime in RUNTIMES:
        home = work / f"home-{runtime}"
        env = {**os.environ, "TRANSFERKIT_HOME": str(home)}
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "transferkit", "finetune", str(data), "-o",
                        str(work / f"run-{runtime}"), "--runtime", runtime, "--overwrite",
                        *options],
                       check=True, capture_output=True, env=env)
        record = json.loads((work / f"run-{runtime}" / "run.json").read_text())
        test = [s for s in record["scores"] if s["split"] == "test"]
        rows[runtime] = {"seconds": time.perf_counter() - began,
                         "kept": record["choice"]["kept"],
                         "test_accuracy": test[0]["accuracy"] if test else None}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--finetune", type=Path, nargs="*", default=[])
    parser.add_argument("--probe-only", action="store_true",
                        help="finetune with --finetune-epochs 0: the passes, not the training")
    parser.add_argument("--only-finetune", action="store_true")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    if args.only_finetune:
        with tempfile.TemporaryDirectory() as scratch:
            options = ["--finetune-epochs", "0"] if args.probe_only else []
            for d in args.finetune:
                for runtime, row in finetune(d, Path(scratch), options).items():
                    print(f"{runtime:5s} finetune {d.name} {' '.join(options)}: "
                          f"{row['seconds']:.0f} s, kept {row['kept']}, test "
                          f"{row['test_accuracy']}", flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        os.environ["TRANSFERKIT_HOME"] = str(work / "home")  # an empty graph cache
        results = {"floor": floor()}
        print(f"floor: tf {results['floor']['tf']:.1f}, ort {results['floor']['onnx']:.1f} "
              f"images/s", flush=True)
        files = [str(p) for p in sorted(args.images.rglob("*"))
                 if p.suffix.lower() in (".jpg", ".png")]
        results["predict_cli_s"] = predict_runs(args.run, args.images, work)
        import transferkit  # noqa: F401  (sets the Keras backend)

        results["extract"] = extract_rates(files)
        results["predict_rate"] = predict_rate(args.run, args.images)
        results["serve_64"] = serve_load(args.run, args.images, args.seconds)
        options = ["--finetune-epochs", "0"] if args.probe_only else []
        results["finetune"] = {d.name: finetune(d, work, options) for d in args.finetune}
    ort = results["floor"]["onnx"]
    for runtime in RUNTIMES:
        e, p, s = (results["extract"][runtime], results["predict_cli_s"][runtime],
                   results["serve_64"][runtime])
        print(f"{runtime:5s} extract {e[0]:.1f} then {e[1]:.1f} images/s "
              f"({e[1] / ort:.2f}x the ort floor); predict CLI {p[0]:.1f} s then {p[1]:.1f} s, "
              f"in-process {results['predict_rate'][runtime]:.1f} images/s; serve at 64 "
              f"clients {s['images_per_s']:.1f} images/s, p50 {s['p50_ms']:.0f} ms, p99 "
              f"{s['p99_ms']:.0f} ms")
        for name, rows in results["finetune"].items():
            row = rows[runtime]
            print(f"      finetune {name}: {row['seconds']:.0f} s, kept {row['kept']}, "
                  f"test {row['test_accuracy']}")
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
