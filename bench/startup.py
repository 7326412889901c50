"""How fast the command line answers before any work: `--help`, a command's help, and usage
errors (an unknown option, a value out of range, a missing argument), each run as a user
would, through the installed entry point. Prints the median and worst of N runs and the exit
codes. Usage: python bench/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "transferkit --help": ["--help"],
    "finetune --help": ["finetune", "--help"],
    "unknown option": ["finetune", "DATA", "-o", "RUN", "--learning-rat", "3e-4"],
    "value out of range": ["finetune", "DATA", "-o", "RUN", "--zoom-range", "5"],
    "bad choice": ["cv", "DATA", "-o", "RUN", "--optimizer", "adamw"],
    "missing argument": ["predict"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    entry = shutil.which("transferkit") or sys.exit("transferkit is not installed here")
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        for name in ("a", "b"):
            (data / name).mkdir(parents=True)
        print(f"{'case':<22} {'exit':>4} {'median s':>9} {'worst s':>8}")
        for label, args in CASES.items():
            args = [str(data) if a == "DATA" else str(Path(work) / "run") if a == "RUN" else a
                    for a in args]
            times, codes = [], set()
            for _ in range(runs):
                start = time.perf_counter()
                done = subprocess.run([entry, *args], capture_output=True)
                times.append(time.perf_counter() - start)
                codes.add(done.returncode)
            print(f"{label:<22} {'/'.join(map(str, sorted(codes))):>4} "
                  f"{statistics.median(times):>9.3f} {max(times):>8.3f}")


if __name__ == "__main__":
    main()
