"""CVAT for video 1.1 XML: a video job's tracks, grouped by track in a temporary SQLite file, not memory."""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

from models.detector import DetectorInfo
from models.shapes import Shape
from server.formats.cvat_xml import Xml, cvat_label, mask_attributes
from server.formats.files import LabelTable, atomic, f2, label_of
from server.formats.stored import shape_from_dict, shape_to_dict
from server.formats.tracks import Numbering, TrackResults, VideoMeta


def write_cvat_video(path: Path, info: DetectorInfo, tracks: TrackResults, meta: VideoMeta) -> None:
    """Tracks of boxes (or masks, for segmentation models: CVAT's RLE over the mask's box, as in the image
    writer). A track takes the label it was seen with most often (the first on a tie)."""
    table = LabelTable.for_detector(info)
    numbering = Numbering()
    labels: dict[int, Counter[str]] = {}
    width = height = 0
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tracks-") as scratch:
        db = sqlite3.connect(Path(scratch) / "tracks.sqlite3", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("CREATE TABLE shapes (track INTEGER, frame INTEGER, shape TEXT)")
            db.execute("BEGIN")
            for frame in tracks():
                width, height = (width, height) if width else (frame.width, frame.height)
                rows = []
                for track_id, shape in frame.objects:
                    number = numbering.of(track_id)
                    table.see(shape)
                    labels.setdefault(number, Counter())[label_of(shape)] += 1
                    rows.append((number, frame.frame, json.dumps(shape_to_dict(shape))))
                db.executemany("INSERT INTO shapes VALUES (?, ?, ?)", rows)
            db.execute("COMMIT")
            db.execute("CREATE INDEX by_track ON shapes (track, frame)")
            with atomic(path) as out:
                xml = Xml(out)
                xml.gen.startDocument()
                xml.open("annotations")
                xml.leaf("version", "1.1")
                _cvat_video_meta(xml, table, meta, width, height)
                ordered = db.execute("SELECT track, frame, shape FROM shapes ORDER BY track, frame")
                for number, rows in itertools.groupby(ordered, key=lambda row: row[0]):
                    label = labels[number].most_common(1)[0][0]
                    xml.open("track", {"id": str(number), "label": label, "source": "auto"})
                    seen = [(frame, shape_from_dict(json.loads(data))) for _, frame, data in rows]
                    _cvat_track_shapes(xml, seen, meta)
                    xml.close("track")
                xml.close("annotations")
                xml.gen.ignorableWhitespace("\n")
                xml.gen.endDocument()
        finally:
            db.close()


def _cvat_video_meta(xml: Xml, table: LabelTable, meta: VideoMeta, width: int, height: int) -> None:
    xml.open("meta")
    xml.open("task")
    xml.leaf("name", meta.name)
    xml.leaf("size", str(meta.size))
    xml.leaf("mode", "interpolation")
    xml.leaf("start_frame", str(meta.start_frame))
    xml.leaf("stop_frame", str(meta.stop_frame))
    xml.leaf("frame_filter", f"step={meta.frame_step}" if meta.frame_step > 1 else "")
    xml.open("labels")
    for name in table.ids:
        cvat_label(xml, name, "any", [])
    xml.close("labels")
    xml.open("original_size")
    xml.leaf("width", str(width))
    xml.leaf("height", str(height))
    xml.close("original_size")
    xml.close("task")
    xml.leaf("source", meta.name)
    xml.close("meta")


def _cvat_track_shapes(xml: Xml, seen: list[tuple[int, Shape]], meta: VideoMeta) -> None:
    """One track's keyframes; an outside shape after each last frame it was seen on, if the job goes on."""
    for (frame, shape), following in itertools.zip_longest(seen, seen[1:]):
        _cvat_track_shape(xml, frame, shape, outside=False)
        after = frame + meta.frame_step
        lost = following is None or following[0] != after
        if lost and after <= meta.stop_frame:
            _cvat_track_shape(xml, after, shape, outside=True)


def _cvat_track_shape(xml: Xml, frame: int, shape: Shape, outside: bool) -> None:
    attrs = {"frame": str(frame), "keyframe": "1", "outside": str(int(outside)), "occluded": "0"}
    if shape.kind == "mask" and shape.mask is not None and not shape.mask.is_empty:
        tag = "mask"
        attrs |= mask_attributes(shape.mask)
    else:
        bounds = shape.bounds()
        assert bounds is not None
        tag = "box"
        attrs |= dict(zip(("xtl", "ytl", "xbr", "ybr"), map(f2, bounds), strict=True))
    xml.open(tag, attrs | {"z_order": "0"})
    xml.close(tag)
