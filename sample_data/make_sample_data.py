"""Regenerates sample_data/ from CC0 pictures bundled with scikit-image.

    pip install scikit-image && python sample_data/make_sample_data.py

Three texture classes (brick, grass, gravel), 30 crops each: random position, scale and
quarter-turn, resized to 96x96 and saved as JPEG. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("brick", "grass", "gravel")
PER_CLASS = 30
SIZE = 96


def crops(picture: np.ndarray, count: int, rng: np.random.Generator) -> list[Image.Image]:
    image = Image.fromarray(picture).convert("RGB")
    out = []
    for _ in range(count):
        side = int(rng.integers(SIZE, min(image.size) // 2))
        x = int(rng.integers(0, image.width - side + 1))
        y = int(rng.integers(0, image.height - side + 1))
        crop = image.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BICUBIC)
        out.append(crop.rotate(90 * int(rng.integers(4))))
    return out


def main() -> None:
    import skimage.data

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for name in CLASSES:
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, crop in enumerate(crops(getattr(skimage.data, name)(), PER_CLASS, rng)):
            crop.save(folder / f"{name}_{i:02d}.jpg", quality=85)
        print(f"{folder}: {PER_CLASS} images")


if __name__ == "__main__":
    main()
