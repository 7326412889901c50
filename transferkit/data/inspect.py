"""The only place that opens image files with Pillow: one full decode per file says whether
it is usable and whether TensorFlow's decoder would get it wrong (EXIF-rotated, with alpha,
CMYK, 16-bit, TIFF...); those are converted once to plain RGB PNGs in the cache, so the
decoding pipeline itself stays pure TensorFlow. What each file was found to be is memoised by
size and modification time."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import stat
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transferkit.cache import CONVERTED, INSPECTED, cache_path
from transferkit.files import atomic_path, write_text
from transferkit.reporting import Reporter

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# Formats and modes tf.io.decode_image turns into the right RGB by itself.
NATIVE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
NATIVE_MODES = frozenset({"RGB", "L", "P"})
# What each image format's files are usually called, to flag content that lies about itself.
FORMAT_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe"}, "MPO": {".jpg", ".jpeg", ".jpe"}, "PNG": {".png"},
    "GIF": {".gif"}, "BMP": {".bmp"}, "WEBP": {".webp"}, "TIFF": {".tif", ".tiff"},
}
ALPHA_BACKGROUND = (255, 255, 255)
# Limits on one image: larger files are skipped and reported, never read or decoded. A 64 MP
# picture (8000 x 8000) decodes to 192 MB of RGB; anything larger is not a training image.
MAX_FILE_BYTES = 256 * 2**20
MAX_PIXELS = 64_000_000
# Pillow warns from 89 megapixels; transferkit reports those images against its own, lower
# limit instead. A filter set once, not per file: catch_warnings is not thread-safe, and
# images are inspected on a thread pool.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_EXIF_ORIENTATION = 0x0112
_CONVERSION_VERSION = "1"  # part of the cache key of converted images
_INSPECTION_VERSION = 2  # bump when inspect_image's findings change


@dataclass(frozen=True)
class ImageInfo:
    """What one full decode of a file found."""

    path: Path
    size_bytes: int
    sha256: str
    format: str | None = None  # from the content, not the extension
    mode: str | None = None
    width: int = 0
    height: int = 0
    orientation: int = 1  # EXIF; 1 is upright
    has_alpha: bool = False
    problem: str | None = None  # why the file cannot be used
    # empty | truncated | unreadable | not_image | special | too_large
    problem_kind: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def needs_conversion(self) -> bool:
        """True when TensorFlow's decoder would not give the right RGB picture."""
        return self.usable and (self.format not in NATIVE_FORMATS or self.mode not in NATIVE_MODES
                                or self.orientation != 1 or self.has_alpha)

    @property
    def extension_mismatch(self) -> bool:
        expected = FORMAT_EXTENSIONS.get(self.format or "")
        return expected is not None and self.path.suffix.lower() not in expected


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file (links followed), at most MAX_FILE_BYTES of them.

    The file is opened without blocking and checked on the open descriptor, so a FIFO named
    like an image never hangs the read and a link to /dev/zero is never read without end.

    Raises:
        UnusableFile: the path is not a regular file, is too large, or cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        reason = {errno.ELOOP: "a loop of symbolic links",
                  errno.ENOENT: "a broken link, or gone"}.get(exc.errno or 0, exc.strerror)
        raise UnusableFile(f"cannot be read ({reason})", "unreadable") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnusableFile("not a regular file (a FIFO, device, socket or folder)",
                               "special")
        if info.st_size > MAX_FILE_BYTES:
            raise UnusableFile(f"{info.st_size / 2**20:.0f} MiB, above the "
                               f"{MAX_FILE_BYTES // 2**20} MiB limit for one image", "too_large")
        try:
            return f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise UnusableFile(f"cannot be read ({exc.strerror})", "unreadable") from None


class UnusableFile(Exception):
    """Why a file cannot be an image: a message and a kind (see ImageInfo.problem_kind)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def inspect_image(path: Path) -> ImageInfo:
    """Reads and fully decodes one file; never raises for a bad file, it says why instead."""
    try:
        data = read_regular_file(path)
    except UnusableFile as unusable:
        return ImageInfo(path, 0, "", problem=str(unusable), problem_kind=unusable.kind)
    return inspect_bytes(path, data)


def inspect_bytes(path: Path, data: bytes, check_extension: bool = True) -> ImageInfo:
    """inspect_image for bytes already read (`path` names them); `check_extension` False
    for bytes that came without a file name (serve's request bodies)."""
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageInfo(path, 0, digest, problem="empty file (0 bytes)", problem_kind="empty")
    if check_extension and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return ImageInfo(path, len(data), digest,
                         problem=f"not an image file (extension '{path.suffix}')",
                         problem_kind="not_image")
    found: dict = {}
    try:
        with Image.open(io.BytesIO(data)) as im:
            found = {"format": im.format, "mode": im.mode, "width": im.width,
                     "height": im.height, "has_alpha": _has_alpha(im),
                     "orientation": int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)}
            if im.width * im.height > MAX_PIXELS:
                return ImageInfo(path, len(data), digest, **found, problem_kind="too_large",
                                 problem=f"{im.width}x{im.height} is "
                                         f"{im.width * im.height / 1e6:.0f} megapixels, "
                                         f"above the limit of {MAX_PIXELS / 1e6:.0f}; "
                                         f"downscale it")
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, reading every byte
            im.load()
    except Image.DecompressionBombError as exc:
        return ImageInfo(path, len(data), digest, **found, problem_kind="too_large",
                         problem=f"above the limit of {MAX_PIXELS / 1e6:.0f} megapixels ({exc})")
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow names the in-memory buffer it read ("<_io.BytesIO object at 0x...>"): the
        # file is named beside the message already
        message = re.sub(r"\s*<[^<>]* object at 0x[0-9a-f]+>", "", str(exc)) or \
            type(exc).__name__
        kind = "truncated" if "truncat" in message.lower() else "unreadable"
        return ImageInfo(path, len(data), digest, **found,
                         problem=f"{'truncated' if kind == 'truncated' else 'unreadable'} "
                                 f"image ({message})", problem_kind=kind)
    return ImageInfo(path, len(data), digest, **found)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB, alpha composited on white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(im, dtype=np.float64)
        peak = pixels.max() if pixels.size else 0
        scale = 255.0 / 65535.0 if peak > 255 else (255.0 if im.mode == "F" and peak <= 1 else 1)
        im = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), mode="L")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def rgb_png(data: bytes) -> bytes:
    """The image in `data` as upright 8-bit RGB PNG bytes: what converted_path holds, made
    in memory (for images that arrive over the network and are never written to disk)."""
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        _to_rgb(im).save(buffer, format="PNG")
    return buffer.getvalue()


def converted_path(info: ImageInfo) -> Path:
    """Where the plain-RGB copy of an image that needs conversion lives (made once)."""
    target = cache_path(CONVERTED) / f"{info.sha256}-v{_CONVERSION_VERSION}.png"
    if not target.is_file():
        with Image.open(info.path) as im, atomic_path(target) as tmp:
            _to_rgb(im).save(tmp, format="PNG")
    return target


class InspectionCache:
    """What inspect_image found for each file, reused while the file's size and modification
    time are unchanged, so re-reading a folder decodes only new or edited files."""

    def __init__(self) -> None:
        self.path = cache_path(INSPECTED)
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if stored.get("version") == _INSPECTION_VERSION:
                self.entries = stored["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no cache yet, or an unreadable one: start afresh

    @staticmethod
    def _stamp(path: Path) -> list[int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, path: Path) -> ImageInfo | None:
        entry = self.entries.get(os.path.realpath(path))  # realpath: loops do not raise
        stamp = self._stamp(path)
        if entry is None or stamp is None or entry["stamp"] != stamp:
            return None
        return ImageInfo(path=path, **entry["info"])

    def put(self, info: ImageInfo) -> None:
        stamp = self._stamp(info.path)
        if stamp is not None:
            fields = {k: v for k, v in dataclasses.asdict(info).items() if k != "path"}
            self.entries[os.path.realpath(info.path)] = {"stamp": stamp, "info": fields}
            self.changed = True

    def save(self) -> None:
        if self.changed:
            write_text(self.path, json.dumps({"version": _INSPECTION_VERSION,
                                              "files": self.entries}))


@contextmanager
def open_inspection_cache(enabled: bool = True) -> Iterator[InspectionCache | None]:
    """The inspection memo for one command (None when `enabled` is false), read once and
    written once at the end, also when the command stops on a DataError half-way."""
    cache = InspectionCache() if enabled else None
    try:
        yield cache
    finally:
        if cache is not None:
            cache.save()


def inspect_images(paths: Sequence[Path], reporter: Reporter, cache: InspectionCache | None,
                   description: str = "Checking images") -> list[ImageInfo]:
    """`inspect_image` over many files on a thread pool (PIL decodes without the GIL); files
    that `cache` knows unchanged are not decoded again."""
    known = [cache.get(p) if cache is not None else None for p in paths]
    todo = [p for p, k in zip(paths, known, strict=True) if k is None]
    reporter.start_progress(description, len(todo))
    fresh: dict[Path, ImageInfo] = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for info in pool.map(inspect_image, todo):
            fresh[info.path] = info
            if cache is not None:
                cache.put(info)
            reporter.advance()
    reporter.stop_progress()
    return [k if k is not None else fresh[p] for p, k in zip(paths, known, strict=True)]


def small_image(source: str, mode: str, size: int, square: bool = True) -> Image.Image:
    """The image at `source` (a decodable file, see decode_source) in Pillow `mode`, resized
    to `size` pixels square (or, not `square`, to fit within them, keeping its shape). JPEGs
    decode at a fraction of their size first (Pillow's draft), so a thumbnail costs
    milliseconds."""
    with open(os.fsencode(source), "rb") as f, Image.open(f) as image:
        image.draft(mode, (2 * size, 2 * size))
        small = image.convert(mode)
        if square:
            return small.resize((size, size), Image.Resampling.LANCZOS)
        small.thumbnail((size, size))
        return small


def decode_source(info: ImageInfo) -> str:
    """The file the tf.data pipeline decodes for this image: itself, or its converted copy."""
    return str(converted_path(info) if info.needs_conversion else info.path)
