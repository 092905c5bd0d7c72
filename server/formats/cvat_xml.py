"""CVAT for images 1.1 XML, in CVAT's own layout; its XML writer and label block serve CVAT for video too."""

from __future__ import annotations

from pathlib import Path
from typing import IO
from xml.sax.saxutils import XMLGenerator

from models.detector import DetectorInfo
from models.shapes import RegionMask, Shape
from server.formats.files import LabelTable, Results, atomic, f2, label_of
from server.formats.rle import cvat_rle


class Xml:
    """CVAT's own layout: two-space indentation, one element per line (its XmlAnnotationWriter)."""

    def __init__(self, out: IO[str]) -> None:
        self.gen = XMLGenerator(out, "utf-8")
        self.level = 0

    def open(self, tag: str, attrs: dict[str, str] | None = None) -> None:
        self.gen.ignorableWhitespace("\n" + "  " * self.level)
        self.gen.startElement(tag, attrs or {})
        self.level += 1

    def close(self, tag: str) -> None:
        self.level -= 1
        self.gen.ignorableWhitespace("\n" + "  " * self.level)
        self.gen.endElement(tag)

    def leaf(self, tag: str, text: str = "", attrs: dict[str, str] | None = None) -> None:
        self.gen.ignorableWhitespace("\n" + "  " * self.level)
        self.gen.startElement(tag, attrs or {})
        self.gen.characters(text)
        self.gen.endElement(tag)


def write_cvat_images(path: Path, info: DetectorInfo, results: Results) -> None:
    """CVAT for images 1.1. Masks follow CVAT's exporter (cvat/apps/dataset_manager/formats/cvat.py):
    `rle` holds the CVAT RLE runs over the mask's own inclusive box, which `left`, `top`, `width`, `height`
    give. Scores have no place in CVAT XML and are left out; shape attributes become <attribute>s."""
    table = LabelTable.for_detector(info)
    skeleton_points: list[str] = list(info.keypoint_names)
    size = 0
    for result in results():  # first pass: the labels, attributes and skeleton points <meta> declares
        size += 1
        for shape in result.shapes:
            table.see(shape)
            if shape.kind == "keypoints" and not skeleton_points:
                skeleton_points = [k.name for k in shape.keypoints or []]

    with atomic(path) as out:
        xml = Xml(out)
        xml.gen.startDocument()
        xml.open("annotations")
        xml.leaf("version", "1.1")
        xml.open("meta")
        xml.open("task")
        xml.leaf("size", str(size))
        xml.leaf("mode", "annotation")
        xml.open("labels")
        for name in table.ids:
            is_skeleton = "keypoints" in table.kinds.get(name, ())
            cvat_label(xml, name, "skeleton" if is_skeleton else "any", table.attributes.get(name, []))
            if is_skeleton:
                for point in skeleton_points:
                    cvat_label(xml, point, "points", [], parent=name)
        xml.close("labels")
        xml.close("task")
        xml.close("meta")
        for result in results():
            attrs = {"id": str(result.index), "name": result.name}
            xml.open("image", attrs | {"width": str(result.width), "height": str(result.height)})
            for shape in result.shapes:
                if shape.kind != "tag":
                    _cvat_shape(xml, shape)
            for shape in result.shapes:
                if shape.kind == "tag":  # CVAT puts tags after the shapes
                    xml.open("tag", {"label": label_of(shape), "source": "auto"})
                    _cvat_attributes(xml, shape)
                    xml.close("tag")
            xml.close("image")
        xml.close("annotations")
        xml.gen.ignorableWhitespace("\n")
        xml.gen.endDocument()


def cvat_label(xml: Xml, name: str, kind: str, attributes: list[str], parent: str | None = None) -> None:
    xml.open("label")
    xml.leaf("name", name)
    xml.leaf("type", kind)
    xml.open("attributes")
    for attribute in attributes:
        xml.open("attribute")
        xml.leaf("name", attribute)
        xml.leaf("mutable", "False")
        xml.leaf("input_type", "text")
        xml.leaf("default_value")
        xml.leaf("values")
        xml.close("attribute")
    xml.close("attributes")
    if parent is not None:
        xml.leaf("parent", parent)
    xml.close("label")


def _cvat_attributes(xml: Xml, shape: Shape) -> None:
    for name, value in shape.attributes.items():
        xml.leaf("attribute", value, {"name": name})


def _cvat_shape(xml: Xml, shape: Shape) -> None:
    base = {"label": label_of(shape), "source": "auto"}
    if shape.kind in ("box", "rotated_box"):
        assert shape.box is not None
        tag = "box"
        attrs = (
            base
            | {"occluded": "0"}
            | dict(zip(("xtl", "ytl", "xbr", "ybr"), map(f2, shape.box), strict=True))
        )
        if shape.rotation % 360:
            attrs["rotation"] = f2(shape.rotation % 360)
    elif shape.kind == "polygon":
        assert shape.polygon is not None
        tag, attrs = "polygon", base | {"occluded": "0", "points": _cvat_points(shape.polygon)}
    elif shape.kind == "mask":
        assert shape.mask is not None
        if shape.mask.is_empty:  # CVAT cannot hold a mask without pixels
            return
        tag = "mask"
        attrs = base | {"occluded": "0"} | mask_attributes(shape.mask)
    else:  # keypoints
        assert shape.keypoints is not None
        xml.open("skeleton", base | {"z_order": "0"})
        for k in shape.keypoints:
            outside = "0" if k.visible else "1"
            point = {"label": k.name, "source": "auto", "outside": outside, "occluded": "0"}
            xml.leaf("points", attrs=point | {"points": _cvat_points([k.x, k.y])})
        _cvat_attributes(xml, shape)
        xml.close("skeleton")
        return
    xml.open(tag, attrs | {"z_order": "0"})
    _cvat_attributes(xml, shape)
    xml.close(tag)


def mask_attributes(mask: RegionMask) -> dict[str, str]:
    """A <mask>'s geometry as CVAT's exporter writes it: RLE runs over the mask's own inclusive box."""
    *runs, xtl, ytl, xbr, ybr = cvat_rle(mask)
    return {
        "rle": ", ".join(map(str, runs)),  # CVAT's exporter writes str(list)[1:-1]
        "left": str(xtl),
        "top": str(ytl),
        "width": str(xbr - xtl + 1),
        "height": str(ybr - ytl + 1),
    }


def _cvat_points(flat: list[float]) -> str:
    return ";".join(f"{f2(x)},{f2(y)}" for x, y in zip(flat[0::2], flat[1::2], strict=True))
