"""A review's static HTML report: one self-contained file (thumbnails inlined as PNG data URIs), the findings
grouped by kind in rank order, each with the annotated shape (left, red) and the model's (right, green)
drawn on the same crop of the image."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from server.formats.files import REVIEW_REPORT, atomic
from server.formats.findings import PREDICTIONS_NOTE, Finding

REPORT_FILE = REVIEW_REPORT
THUMB = 160  # longest side of a thumbnail, pixels
KIND_TITLES = {
    "missing": "Missing objects (the model sees one nobody annotated)",
    "badloc": "Badly located boxes",
    "swap": "Swapped classes",
    "spurious": "Spurious boxes (nothing the model sees is there)",
    "sloppy_edge": "Sloppy edges (SAM's mask disagrees with the polygon or mask)",
}
RED, GREEN = (220, 30, 30), (30, 180, 30)

Image = Callable[[int], np.ndarray | None]  # frame -> decoded RGB image, None when it cannot be read


def write_report(path: Path, findings: list[Finding], image_of: Image, thumbnails: int, title: str) -> None:
    """The report of `findings` (in rank order); the first `thumbnails` get pictures, the rest a table row."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(PREDICTIONS_NOTE)}</p>",
    ]
    pictured = {id(f) for f in findings[:thumbnails]}
    for kind, heading in KIND_TITLES.items():
        group = [(rank, f) for rank, f in enumerate(findings, start=1) if f.kind == kind]
        if not group:
            continue
        parts.append(f"<h2 id='{kind}'>{html.escape(heading)}: {len(group)}</h2><div class='grid'>")
        for rank, finding in group:
            pictures = _pictures(finding, image_of) if id(finding) in pictured else ""
            parts.append(f"<div class='card'>{pictures}{_caption(rank, finding)}</div>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    with atomic(path) as out:
        out.write("".join(parts))


def _caption(rank: int, f: Finding) -> str:
    what = f"#{rank} {f.kind} score {f.score:.3f}<br>{html.escape(f.image)} (frame {f.frame})<br>"
    what += f"label {html.escape(f.label)}"
    if f.suggested_label:
        what += f" → {html.escape(f.suggested_label)}"
    if f.shape_id is not None:
        what += f", shape {html.escape(f.shape_id)}"
    if f.model_score is not None:
        what += f", model conf {f.model_score:.2f}"
    if f.iou is not None:
        what += f", IoU {f.iou:.2f}"
    return f"<p>{what}</p>"


def _pictures(f: Finding, image_of: Image) -> str:
    image = image_of(f.frame)
    if image is None:
        return "<p class='note'>(image unreadable)</p>"
    boxes = [b for b in (f.box, f.suggested_box) if b is not None]
    if not boxes:
        return ""
    height, width = image.shape[:2]
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = 0.3 * max(x2 - x1, y2 - y1, 8)
    left, top = max(int(x1 - margin), 0), max(int(y1 - margin), 0)
    right, bottom = min(int(x2 + margin) + 1, width), min(int(y2 + margin) + 1, height)
    crop = np.ascontiguousarray(image[top:bottom, left:right])
    scale = THUMB / max(crop.shape[:2])
    size = (max(int(crop.shape[1] * scale), 1), max(int(crop.shape[0] * scale), 1))
    annotated, model = (cv2.resize(crop, size, interpolation=cv2.INTER_NEAREST) for _ in range(2))
    if f.box is not None:
        _draw(annotated, f.box, left, top, scale, RED)
    if f.suggested_mask is not None:
        full = f.suggested_mask.to_full()[top:bottom, left:right].astype(np.uint8)
        outline = cv2.resize(full, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(model, contours, -1, GREEN, 1)
    elif f.suggested_box is not None:
        _draw(model, f.suggested_box, left, top, scale, GREEN)
    return "<div class='pair'>" + _img(annotated, "annotated") + _img(model, "model") + "</div>"


def _draw(
    image: np.ndarray, box: tuple[float, float, float, float], left: int, top: int, scale: float, colour
):
    p1 = (int((box[0] - left) * scale), int((box[1] - top) * scale))
    p2 = (int((box[2] - left) * scale), int((box[3] - top) * scale))
    cv2.rectangle(image, p1, p2, colour, 1)


def _img(image: np.ndarray, alt: str) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    data = base64.b64encode(png.tobytes()).decode() if ok else ""
    return f"<img alt='{alt}' title='{alt}' src='data:image/png;base64,{data}'>"


_CSS = (
    "body{font-family:sans-serif;margin:1em}.note{color:#555}.grid{display:flex;flex-wrap:wrap;gap:8px}"
    ".card{border:1px solid #ccc;padding:4px;width:340px;font-size:12px}.pair img{margin-right:4px;"
    "image-rendering:pixelated}"
)
