"""Image sets from a source none of the shared bench sets uses: the Open Clip Art Library
(Debian's openclipart-png, public domain), clip art on transparent backgrounds, drawn by
hundreds of hands: the style of tuxpaint's stamps, not their pictures.

Builds, each 224 x 224 on white like make_datasets.py's tuxpaint sets:
- openclipart10: 10 categories, train / val / test at 60 / 20 / 20 %;
- openclipart_unknown: one folder per category that neither tuxpaint10 nor openclipart10 has
  (vehicles, tools, sports, music, ...), at most PER_UNKNOWN images each: "none of these"
  images of the same style for a run on tuxpaint10 or openclipart10.

    python bench/openclipart.py --out /tmp/tk-data

The tuxpaint stamp categories outside tuxpaint10 are not used anywhere here (the issue keeps
them back as a check).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

KNOWN = {  # openclipart10: name -> folders under usr/share/openclipart/png
    "mammals": ["animals/mammals"],
    "birds": ["animals/birds"],
    "bugs": ["animals/bugs"],
    "fruit": ["food/fruit"],
    "desserts": ["food/desserts"],
    "beverages": ["food/beverages"],
    "clothing": ["people/clothing"],
    "vehicles": ["transportation/vehicles"],
    "hardware": ["computer/hardware"],
    "sports": ["recreation/sports"],
}
UNKNOWN = {  # in neither tuxpaint10 nor openclipart10
    "boats": ["transportation/boating"],
    "tools": ["tools/hand_tools", "tools"],
    "electronics": ["electronics"],
    "music": ["recreation/music"],
    "toys": ["recreation/toys"],
    "breads": ["food/breads_and_carbs"],
    "meat_and_eggs": ["food/meats_and_eggs"],
    "fish": ["animals/fish"],
    "office": ["office"],
    "books": ["education/books"],
    "weather": ["signs_and_symbols/weather"],
    "clocks": ["signs_and_symbols/clocks"],
    "smilies": ["people/smilies"],
    "chess": ["recreation/games/chess"],
    "bodyparts": ["people/bodypart"],
    "jigsaw": ["shapes/jigsaw"],
}
PER_UNKNOWN = 25
SIZE = 224


def clipart(cache: Path) -> Path:
    root = cache / "openclipart" / "usr/share/openclipart/png"
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "openclipart-png"], cwd=cache, check=True)
        deb = sorted(cache.glob("openclipart-png_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(cache / "openclipart")], check=True)
    return root


def files_of(root: Path, folders: list[str], taken: set[str]) -> list[str]:
    found = []
    for folder in folders:
        for f in sorted(glob.glob(str(root / folder / "**" / "*.png"), recursive=True)):
            if f not in taken:
                taken.add(f)
                found.append(f)
    return found


def save_square(src: str, dst: Path) -> bool:
    try:
        with Image.open(src) as im:
            im = im.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    side = max(im.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    dst.parent.mkdir(parents=True, exist_ok=True)
    canvas.resize((SIZE, SIZE), Image.BICUBIC).convert("RGB").save(dst, quality=95)
    return True


def build(out: Path, cache: Path, seed: int = 0) -> None:
    Image.MAX_IMAGE_PIXELS = 200_000_000
    root = clipart(cache)
    taken: set[str] = set()
    rng = np.random.default_rng(seed)
    known_root = out / "openclipart10"
    shutil.rmtree(known_root, ignore_errors=True)
    for name, folders in KNOWN.items():
        files = files_of(root, folders, taken)
        order = rng.permutation(len(files))
        n_val = n_test = max(1, round(0.2 * len(files)))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            save_square(files[i], known_root / split / name / f"{Path(files[i]).stem}.jpg")
    unknown_root = out / "openclipart_unknown"
    shutil.rmtree(unknown_root, ignore_errors=True)
    for name, folders in UNKNOWN.items():
        files = files_of(root, folders, taken)
        for i in rng.permutation(len(files))[:PER_UNKNOWN]:
            save_square(files[i], unknown_root / name / f"{Path(files[i]).stem}.jpg")
    for built in (known_root, unknown_root):
        print(built, sum(1 for _ in built.rglob("*.jpg")), "images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "tk-sources")
    args = parser.parse_args()
    build(args.out, args.cache)


if __name__ == "__main__":
    main()
