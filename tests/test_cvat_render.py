"""Every internal shape kind rendered as a Nuclio detector item, checked against CVAT's rules (§A.5, §C)."""

from __future__ import annotations

import numpy as np

from models.shapes import Keypoint, RegionMask, Shape
from server.formats.cvat_json import detector_item, interactor_reply
from server.formats.rle import cvat_rle_decode


def test_box_rotated_box_polygon_tag_and_attributes() -> None:
    box = detector_item(Shape("box", label="car", score=0.9, box=(3, 3, 15, 15), attributes={"color": "red"}))
    assert box == {
        "label": "car",
        "confidence": "0.9000",
        "type": "rectangle",
        "points": [3.0, 3.0, 15.0, 15.0],
        "attributes": [{"name": "color", "value": "red"}],
    }
    rotated = detector_item(Shape("rotated_box", label="ship", box=(0, 0, 10, 4), rotation=-30))
    assert rotated["type"] == "rectangle" and rotated["rotation"] == 330.0
    polygon = detector_item(Shape("polygon", label="p", polygon=[10, 10, 10, 20, 20, 10]))
    assert polygon["type"] == "polygon" and len(polygon["points"]) >= 6 and len(polygon["points"]) % 2 == 0
    assert detector_item(Shape("tag", label="indoor")) == {"label": "indoor", "type": "tag"}


def test_mask_has_bbox_bitmap_and_polygon() -> None:
    full = np.zeros((12, 16), bool)
    full[2:9, 4:11] = True
    item = detector_item(Shape("mask", label="person", score=0.5, mask=RegionMask.from_full(full)))
    *bitmap, xtl, ytl, xbr, ybr = item["mask"]
    assert (xtl, ytl, xbr, ybr) == (4, 2, 10, 8)
    assert len(bitmap) == (xbr - xtl + 1) * (ybr - ytl + 1)  # CVAT's to_cvat_mask layout
    assert set(bitmap) == {255}
    points = item["points"]
    assert len(points) >= 6 and len(points) % 2 == 0


def test_cvat_doc_example_bitmap() -> None:
    full = np.zeros((4, 4), bool)
    full[:, :2] = True
    item = detector_item(Shape("mask", label="m", mask=RegionMask.from_full(full)))
    # The doc's example: [255,255,0,0,...] over bbox [0,0,2,3] → here the tight box is 2 columns wide.
    assert item["mask"] == [255] * 8 + [0, 0, 1, 3]


def test_skeleton_elements() -> None:
    shape = Shape(
        "keypoints", label="body", keypoints=[Keypoint("nose", 48.8, 9.4), Keypoint("eye", 51, 7, False)]
    )
    item = detector_item(shape)
    assert item["type"] == "skeleton"
    assert item["elements"] == [
        {"label": "nose", "type": "points", "points": [48.8, 9.4], "outside": False},
        {"label": "eye", "type": "points", "points": [51.0, 7.0], "outside": True},
    ]


def test_interactor_reply_skips_empty_masks_and_clamps_confidence() -> None:
    full = np.zeros((5, 6), bool)
    full[1:3, 2:5] = True
    reply = interactor_reply([(RegionMask.from_full(full), 1.7), (RegionMask.empty(6, 5), 0.3)])
    (shape,) = reply["shapes"]
    assert shape["points"] == [0, 6, 2, 1, 4, 2]  # cvat_sdk.masks.encode_mask's result for this bitmap
    assert shape["attributes"] == [{"spec_id": 0, "value": "1.0000"}]
    assert np.array_equal(cvat_rle_decode(shape["points"], 6, 5).to_full(), full)
