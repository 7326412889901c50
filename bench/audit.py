"""`transferkit audit` on planted data: clean images with a share of labels flipped, and
resized, re-encoded or slightly cropped copies of val images placed in train. Measures how
many flipped images audit ranks within the top N (N = the number flipped), how many planted
copies it finds, how many other pairs it reports, and its time once features are cached.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint10
    python bench/audit.py --data /tmp/tk-data/tuxpaint10 sample_data
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def plant(source: Path, target: Path, flip: float = 0.08, copies: int = 10, seed: int = 0
          ) -> dict:
    """Copies `source` to `target`, flips `flip` of the training labels (moving each file to
    another class's folder) and puts `copies` altered copies of val images into train.
    A flat folder (no train/) gets a val/ of a fifth of each class first. Returns what was
    planted: flipped paths and copy pairs, relative to `target`."""
    rng = random.Random(seed)
    shutil.copytree(source, target)
    if not (target / "train").is_dir():
        flat = [d for d in sorted(target.iterdir()) if d.is_dir()]
        for d in flat:
            files = _images(d)
            rng.shuffle(files)
            for i, f in enumerate(files):
                split = "val" if i < max(1, len(files) // 5) else "train"
                (target / split / d.name).mkdir(parents=True, exist_ok=True)
                f.rename(target / split / d.name / f.name)
            d.rmdir()
    classes = sorted(d.name for d in (target / "train").iterdir() if d.is_dir())
    train = _images(target / "train")
    flipped = []
    for f in rng.sample(train, round(flip * len(train))):
        other = rng.choice([c for c in classes if c != f.parent.name])
        moved = target / "train" / other / f"flipped_{f.name}"
        f.rename(moved)
        flipped.append(moved.relative_to(target).as_posix())
    pairs = []
    for k, f in enumerate(rng.sample(_images(target / "val"), copies)):
        with Image.open(f) as image:
            image = image.convert("RGB")
            w, h = image.size
            if k % 3 == 2:  # a slight crop: 5 % off two sides
                image = image.crop((int(0.05 * w), int(0.05 * h), w, h))
            scale = (0.8, 0.6, 1.0)[k % 3]
            image = image.resize((max(8, int(w * scale)), max(8, int(h * scale))))
            copy = target / "train" / f.parent.name / f"copy_{f.stem}.jpg"
            image.save(copy, "JPEG", quality=(75, 60, 85)[k % 3])  # re-encoded
        pairs.append(sorted([f.relative_to(target).as_posix(),
                             copy.relative_to(target).as_posix()]))
    return {"flipped": flipped, "copies": pairs}


def measure(source: Path, workdir: Path, seed: int) -> dict:
    data = workdir / f"planted-{source.name}"
    planted = plant(source, data, seed=seed)
    out = workdir / f"audit-{source.name}"
    command = [sys.executable, "-m", "transferkit", "audit", str(data), "-o", str(out)]
    subprocess.run(command, check=True, capture_output=True)  # computes and caches features
    start = time.perf_counter()
    subprocess.run([*command, "--overwrite"], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    found = json.loads((out / "audit.json").read_text())
    n = len(planted["flipped"])
    ranked = [i["path"] for i in found["label_quality"]]
    in_top = len(set(ranked[:n]) & set(planted["flipped"]))
    reported = {tuple(sorted(p["paths"])) for p in found["near_duplicates"]}
    copies = {tuple(p) for p in planted["copies"]}
    return {"set": source.name, "seed": seed, "images": found["images"], "flipped": n,
            "flipped_in_top_n": in_top, "flagged": len(found["label_issues"]),
            "copies": len(copies), "copies_found": len(copies & reported),
            "other_pairs": len(reported - copies), "outliers": len(found["outliers"]),
            "seconds_cached": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.sets:
            for seed in args.seeds:
                work = Path(tmp) / f"{source.name}-{seed}"
                work.mkdir()
                rows.append(measure(source, work, seed))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| set | seed | images | flipped in top N / N | copies found | other pairs | "
          "outliers | audit s (cached) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['seed']} | {r['images']} | {r['flipped_in_top_n']}/"
              f"{r['flipped']} ({r['flipped_in_top_n'] / max(r['flipped'], 1):.0%}) | "
              f"{r['copies_found']}/{r['copies']} | {r['other_pairs']} | {r['outliers']} | "
              f"{r['seconds_cached']} |")


if __name__ == "__main__":
    main()
