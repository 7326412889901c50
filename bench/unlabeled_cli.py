"""`finetune --unlabeled` as users get it: the CLI, a process per run, with and without the
pool, on sets cut to a few labels a class.

Per set and seed: `--per-class` images of each class of the set's train split (drawn by the
seed) are the labelled train split; val and test are the set's own; every other train image
is the unlabelled pool (a folder of its own, no labels). Then, each in its own process,
`transferkit finetune CUT --seed S` and the same with `--unlabeled POOL`, and each run's
test accuracy, kept model and wall time. The images are hard links into the set's folders.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data digits digits_full tuxpaint10
    python -m bench.unlabeled_cli --sets digits tuxpaint10 digits_full --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np

from bench.accuracy import transferkit_side


def link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def cut(data: Path, per_class: int, seed: int, out: Path) -> tuple[Path, Path]:
    """The labelled folder (per_class train images a class, the set's val and test) and the
    pool folder (the other train images) under `out`."""
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    labelled, pool = out / "data", out / "pool"
    for split in ("val", "test"):
        for f in sorted((data / split).rglob("*")):
            if f.is_file():
                link(f, labelled / split / f.relative_to(data / split))
    for folder in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.is_file())
        picked = set(rng.choice(len(files), min(per_class, len(files)), replace=False))
        for i, f in enumerate(files):
            if i in picked:
                link(f, labelled / "train" / folder.name / f.name)
            else:
                link(f, pool / f"{folder.name}-{f.name}")
    return labelled, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["digits", "tuxpaint10", "digits_full"])
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tk-unlabeled"))
    args = parser.parse_args()
    for name in args.sets:
        rows = []
        for seed in args.seeds:
            data, pool = cut(args.data / name, args.per_class, seed,
                             args.work / f"{name}-{seed}")
            row = {"set": name, "seed": seed, "pool": sum(1 for _ in pool.iterdir())}
            for arm, options in (("without", {}), ("with", {"unlabeled": str(pool)})):
                work = args.work / f"{name}-{seed}" / arm
                work.mkdir(parents=True, exist_ok=True)
                got = transferkit_side(data, seed, work, options)
                row[arm] = {k: got[k] for k in ("accuracy", "seconds", "kept", "val_correct")}
            rows.append(row)
            print(json.dumps(row), flush=True)
        gains = [100 * (r["with"]["accuracy"] - r["without"]["accuracy"]) for r in rows]
        print(f"| {name} | {args.per_class} | {rows[0]['pool']} | "
              + " | ".join(f"{statistics.mean(r[a]['accuracy'] for r in rows):.3f} ± "
                           f"{statistics.pstdev(r[a]['accuracy'] for r in rows):.3f}"
                           for a in ("without", "with"))
              + f" | {statistics.mean(gains):+.1f} (min {min(gains):+.1f}) | "
              + ", ".join(r["with"]["kept"] for r in rows) + " | "
              + " / ".join(f"{statistics.mean(r[a]['seconds'] for r in rows):.0f}"
                           for a in ("without", "with")) + " |", flush=True)


if __name__ == "__main__":
    main()
