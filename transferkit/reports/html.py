"""report.html: one self-contained page people open. CSS is inline, images are data URIs
and plots inline SVG, so the page works offline, by e-mail and from any folder; nothing is
fetched from a network. Every piece of text from the data (paths, class names) is escaped.

The page is plain HTML written here rather than through a template engine: a handful of
sections of tables and figures do not need one, and the runtime stays free of it.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.data.inspect import small_image
from transferkit.features import normalise

THUMBNAIL_PX = 96
# Ten colours that stay apart for the usual colour blindnesses (Okabe-Ito, then Tol's).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000", "#882255", "#44AA99")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:72rem;padding:0 1rem;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
.muted{color:#666}table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border-bottom:1px solid #e5e5e5;padding:.25rem .6rem;text-align:left;vertical-align:middle}
th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{width:96px;height:96px;object-fit:contain;background:#f3f3f3;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{width:12rem;font-size:.8rem}
.card img{width:100%;height:auto;max-height:12rem;object-fit:contain;background:#f3f3f3}
.path{word-break:break-all}.bad{color:#b00020}.good{color:#0b6e2d}
figure{margin:.5rem 0}figcaption{font-size:.85rem;color:#555}
"""


def esc(text: object) -> str:
    """Text for HTML; a file name that is not valid UTF-8 shows its bytes as \\xNN."""
    return html.escape(str(text).encode("utf-8", "backslashreplace").decode("utf-8"))


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(subtitle)}</p>"
            + "".join(sections) + "</body></html>")


def section(title: str, *parts: str, note: str = "") -> str:
    explained = f"<p class=\"muted\">{esc(note)}</p>" if note else ""
    return f"<section><h2>{esc(title)}</h2>{explained}{''.join(parts)}</section>"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          numeric: Sequence[bool] | None = None) -> str:
    """`rows` hold HTML (escape text with `esc`); numeric columns align right."""
    numeric = numeric or [False] * len(headers)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers) if any(headers) else ""
    right = ' class="n"'
    body = "".join("<tr>" + "".join(f"<td{right if n else ''}>{cell}</td>"
                                    for cell, n in zip(row, numeric, strict=True)) + "</tr>"
                   for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _jpeg_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(source: str, size: int = THUMBNAIL_PX) -> str:
    """An <img> of the image file as a small JPEG data URI (or a note if it cannot be read)."""
    try:
        small = small_image(source, "RGB", size, square=False)
    except (OSError, ValueError) as exc:
        return f"<span class=\"muted\">(unreadable: {esc(exc)})</span>"
    return f"<img class=\"thumb\" alt=\"\" src=\"{_jpeg_uri(small)}\">"


def heatmap(source: str, cam: np.ndarray, size: int = THUMBNAIL_PX) -> str:
    """An <img> of the image with a class-activation map laid over it (jet, half opaque)."""
    from matplotlib import colormaps
    from PIL import Image

    try:
        small = small_image(source, "RGB", size)
    except (OSError, ValueError) as exc:
        return f"<span class=\"muted\">(unreadable: {esc(exc)})</span>"
    grid = Image.fromarray(np.uint8(255 * np.clip(cam, 0, 1))).resize(
        (size, size), Image.Resampling.BILINEAR)
    colours = np.uint8(255 * colormaps["jet"](np.asarray(grid) / 255.0)[..., :3])
    blended = Image.blend(small, Image.fromarray(colours), 0.45)
    return (f"<img class=\"thumb\" alt=\"Grad-CAM\" title=\"where the model looked\" "
            f"src=\"{_jpeg_uri(blended)}\">")


def png(path: Path, caption: str) -> str:
    """A PNG file embedded as a figure; nothing when the file is missing."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img style=\"max-width:100%\" alt=\"{esc(caption)}\" "
            f"src=\"data:image/png;base64,{data}\"><figcaption>{esc(caption)}</figcaption>"
            f"</figure>")


def projected(features: np.ndarray) -> np.ndarray:
    """Feature vectors as points for `scatter`: their directions (cosine geometry, as the
    audit compares images) on their first two principal components; all at the origin when
    there are too few images, or the features do not vary, to have components."""
    from sklearn.decomposition import PCA

    unit = normalise(features)
    if len(unit) <= 2 or not np.ptp(unit, axis=0).any():
        return np.zeros((len(unit), 2))
    return PCA(2, random_state=0).fit_transform(unit)


def histogram(values: np.ndarray, marker: float, marker_label: str, bins: int = 30,
              width: int = 560, height: int = 160) -> str:
    """An inline SVG histogram of `values` with a vertical line at `marker`."""
    low = float(min(values.min(), marker))
    high = float(max(values.max(), marker))
    counts, edges = np.histogram(values, bins=bins, range=(low, high if high > low else low + 1))
    pad, top = 12, max(int(counts.max()), 1)

    def x(v: float) -> float:
        return pad + (v - edges[0]) / (edges[-1] - edges[0]) * (width - 2 * pad)

    bars = "".join(
        f"<rect x=\"{x(a):.1f}\" y=\"{height - pad - c / top * (height - 2 * pad):.1f}\" "
        f"width=\"{max(x(b) - x(a) - 1, 1):.1f}\" height=\"{c / top * (height - 2 * pad):.1f}\" "
        f"fill=\"{PALETTE[0]}\"><title>{a:.2f} to {b:.2f}: {c}</title></rect>"
        for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True))
    line = (f"<line x1=\"{x(marker):.1f}\" x2=\"{x(marker):.1f}\" y1=\"{pad}\" "
            f"y2=\"{height - pad}\" stroke=\"#b00020\" stroke-width=\"2\">"
            f"<title>{esc(marker_label)}</title></line>")
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
            f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"histogram\" "
            f"style=\"border:1px solid #ddd;background:#fff\">{bars}{line}</svg>"
            f"<div style=\"font-size:.85rem\">{edges[0]:.2f} to {edges[-1]:.2f}; red line: "
            f"{esc(marker_label)}</div>")


def scatter(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            titles: Sequence[str], marked: Sequence[int] = (), size: int = 560) -> str:
    """An inline SVG scatter of 2D points coloured by class, with a legend; each point's
    tooltip is its title, and `marked` points get a red ring."""
    pad = 12
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    xy = pad + (points - low) / span * (size - 2 * pad)
    dots = []
    for (x, y), label, title in zip(xy, labels, titles, strict=True):
        colour = PALETTE[int(label) % len(PALETTE)]
        dots.append(f"<circle cx=\"{x:.1f}\" cy=\"{size - y:.1f}\" r=\"4\" fill=\"{colour}\" "
                    f"fill-opacity=\".75\"><title>{esc(title)}</title></circle>")
    for i in marked:
        x, y = xy[i]
        dots.append(f"<circle cx=\"{x:.1f}\" cy=\"{size - y:.1f}\" r=\"8\" fill=\"none\" "
                    f"stroke=\"#b00020\" stroke-width=\"2\"/>")
    legend = "".join(
        f"<span style=\"margin-right:1rem\"><span style=\"display:inline-block;width:.8rem;"
        f"height:.8rem;background:{PALETTE[i % len(PALETTE)]};border-radius:50%\"></span> "
        f"{esc(name)}</span>" for i, name in enumerate(class_names))
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{size}\" height=\"{size}\" "
            f"viewBox=\"0 0 {size} {size}\" role=\"img\" aria-label=\"embedding map\" "
            f"style=\"border:1px solid #ddd;background:#fff\">{''.join(dots)}</svg>"
            f"<div style=\"font-size:.85rem\">{legend}</div>")
