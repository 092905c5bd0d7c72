"""Mask codecs and the shape model: CVAT RLE against cvat_sdk, COCO RLE against pycocotools, polygons."""

from __future__ import annotations

import cv2
import numpy as np
import pycocotools.mask as coco_mask
import pytest
from cvat_sdk.masks import decode_mask, encode_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.shapes import Keypoint, RegionMask, Shape, mask_from_polygon, polygons
from server.formats.api_json import MASK_FORMATS, render_mask
from server.formats.rle import coco_rle, coco_rle_decode, cvat_detector_mask, cvat_rle, cvat_rle_decode

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

bitmaps = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda hw: arrays(np.bool_, hw, elements=st.booleans())
)
# Random-density bitmaps give long runs and near-empty/near-full masks that 50/50 booleans rarely do.
bitmaps = bitmaps | st.builds(
    lambda shape, density, seed: np.random.default_rng(seed).random(shape) < density,
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.sampled_from([0.0, 0.02, 0.3, 0.9, 0.995, 1.0]),
    st.integers(0, 2**32 - 1),
)
nonempty_bitmaps = bitmaps.filter(lambda b: b.any())


def doc_mask() -> np.ndarray:
    bm = np.zeros((5, 6), bool)
    bm[1:3, 2:5] = True
    return bm


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# -- RegionMask -----------------------------------------------------------------------------------------


def test_region_mask_basics() -> None:
    full = doc_mask()
    m = RegionMask.from_full(full)
    assert m.area() == 6 and not m.is_empty
    assert m.bbox_xyxy_inclusive() == (2, 1, 4, 2)
    assert m.bbox_xywh() == [2, 1, 3, 2]
    t = m.tight()
    assert (t.x0, t.y0, t.bitmap.shape) == (2, 1, (2, 3))
    assert np.array_equal(t.to_full(), full)
    assert t == m
    assert not t.bitmap.flags.writeable


def test_region_mask_empty() -> None:
    m = RegionMask.from_full(np.zeros((4, 7), bool))
    assert m.is_empty and m.area() == 0
    assert m.bbox_xyxy_inclusive() is None and m.bbox_xywh() == [0, 0, 0, 0]
    assert m.tight().bitmap.shape == (0, 0)
    assert m.tight().to_full().shape == (4, 7)


def test_region_mask_rejects_region_outside_image() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        RegionMask(np.ones((3, 3), bool), 8, 0, 10, 10)
    with pytest.raises(ValueError, match="dtype bool"):
        RegionMask(np.ones((3, 3), np.uint8), 0, 0, 10, 10)


# -- CVAT RLE -------------------------------------------------------------------------------------------


def test_cvat_rle_doc_examples() -> None:
    assert cvat_rle(RegionMask.from_full(doc_mask())) == [0, 6, 2, 1, 4, 2]
    # The doc's detector example: bitmap of a 3x4 box, non-zero = foreground.
    detector = [255, 255, 0, 0, 255, 255, 0, 0, 255, 255, 0, 0, 0, 0, 2, 3]
    bm = np.array(detector[:-4]).reshape(4, 3) != 0
    m = RegionMask(bm, 0, 0, 3, 4)
    assert cvat_rle(m) == [0, 2, 2, 2, 2, 2, 2, 0, 0, 2, 3]
    assert cvat_detector_mask(m) == detector


def test_cvat_rle_empty_mask_uses_ui_convention() -> None:
    empty = RegionMask.from_full(np.zeros((5, 6), bool))
    assert cvat_rle(empty) == [0, 0, 0, 0, 0]
    assert cvat_detector_mask(empty) == [0, 0, 0, 0, 0]
    assert cvat_rle_decode([0, 0, 0, 0, 0], 6, 5).is_empty
    assert cvat_rle_decode([1, 0, 0, 0, 0], 6, 5).is_empty  # the SDK's empty form


def test_cvat_rle_decode_non_tight_box() -> None:
    # The doc's encode_mask(bm, bbox=[1,1,5,4]) output, decoded with the box as given.
    m = cvat_rle_decode([1, 3, 1, 3, 4, 1, 1, 4, 3], 6, 5)
    assert (m.x0, m.y0, m.bitmap.shape) == (1, 1, (3, 4))
    assert np.array_equal(m.to_full(), doc_mask())


@settings(max_examples=150, deadline=None)
@given(nonempty_bitmaps)
def test_cvat_rle_matches_cvat_sdk(bm: np.ndarray) -> None:
    h, w = bm.shape
    ours = cvat_rle(RegionMask.from_full(bm))
    assert ours == encode_mask(bm)
    xtl, ytl, xbr, ybr = ours[-4:]
    assert ours == encode_mask(bm, [xtl, ytl, xbr + 1, ybr + 1])  # SDK bbox is exclusive
    assert sum(ours[:-4]) == (xbr - xtl + 1) * (ybr - ytl + 1)
    assert np.array_equal(decode_mask(ours, image_width=w, image_height=h), bm)
    assert np.array_equal(cvat_rle_decode(ours, w, h).to_full(), bm)
    # JSON may carry floats.
    assert np.array_equal(cvat_rle_decode([float(v) for v in ours], w, h).to_full(), bm)


@settings(max_examples=100, deadline=None)
@given(bitmaps, st.integers(0, 9), st.integers(0, 9), st.integers(0, 9), st.integers(0, 9))
def test_region_offsets_give_same_encodings_as_full(
    bm: np.ndarray, x0: int, y0: int, px: int, py: int
) -> None:
    h, w = bm.shape
    region = RegionMask(bm, x0, y0, x0 + w + px, y0 + h + py)
    full = RegionMask.from_full(region.to_full())
    assert cvat_rle(region) == cvat_rle(full)
    assert cvat_detector_mask(region) == cvat_detector_mask(full)
    assert coco_rle(region) == coco_rle(full)
    assert polygons(region, 0) == polygons(full, 0)
    assert region.bbox_xywh() == full.bbox_xywh() and region.area() == full.area()
    assert region == full


@settings(max_examples=100, deadline=None)
@given(nonempty_bitmaps)
def test_cvat_detector_mask_is_bbox_bitmap(bm: np.ndarray) -> None:
    out = cvat_detector_mask(RegionMask.from_full(bm))
    xtl, ytl, xbr, ybr = out[-4:]
    assert set(out[:-4]) <= {0, 255}
    crop = np.array(out[:-4]).reshape(ybr - ytl + 1, xbr - xtl + 1) != 0
    assert np.array_equal(crop, bm[ytl : ybr + 1, xtl : xbr + 1])
    # What CVAT does with it: RLE-encode the crop over the given box.
    assert encode_mask(bm, [xtl, ytl, xbr + 1, ybr + 1]) == cvat_rle(RegionMask.from_full(bm))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([0, 0, 0, 0], "at least 5"),
        ([], "at least 5"),
        ([0, 6, 2, 2, 1, 4, 2], "sum to 8 but the inclusive box 3x2 has 6"),
        ([0, 5, 2, 1, 4, 2], "sum to 5"),
        ([0, 6, 0, 2, 1, 6, 2], "not inside"),  # xbr == width
        ([6, 2, 1, 4, 0], "not inside"),  # ybr < ytl
        ([6, 1, -1, 3, 4], "not inside"),  # negative ytl
        ([7, -1, 2, 1, 4, 2], "non-negative"),
        ([0, 6.5, 2, 1, 4, 2], "integers"),
        ([0, float("nan"), 2, 1, 4, 2], "NaN"),
        (["0", "6", "2", "1", "4", "2"], "numbers"),
        ([[0, 6], 2, 1, 4, 2], "numbers"),
        # Runs whose int64 sum wraps around to the box's 6 pixels (this crashed the process).
        ([2**62, 2**62, 2**62, 2**62 + 6, 2, 1, 4, 2], "more than the 6 pixels"),
        ([2.0**62] * 4 + [1.0, 0, 0, 0, 0], "more than the 1 pixels"),
    ],
)
def test_cvat_rle_decode_validation(points: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cvat_rle_decode(points, 6, 5)


def test_cvat_rle_decode_rejects_bad_image_size() -> None:
    with pytest.raises(ValueError, match="width"):
        cvat_rle_decode([0, 6, 2, 1, 4, 2], 0, 5)


# -- COCO RLE -------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(bitmaps)
def test_coco_rle_round_trips_through_pycocotools(bm: np.ndarray) -> None:
    rle = coco_rle(RegionMask.from_full(bm))
    assert rle["size"] == list(bm.shape) and isinstance(rle["counts"], str)
    reference = coco_mask.encode(np.asfortranarray(bm.astype(np.uint8)))
    assert rle["counts"] == reference["counts"].decode()
    as_coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert np.array_equal(coco_mask.decode(as_coco).astype(bool), bm)
    assert int(coco_mask.area(as_coco)) == RegionMask.from_full(bm).area()
    assert np.array_equal(coco_rle_decode(rle).to_full(), bm)
    assert np.array_equal(coco_rle_decode(as_coco).to_full(), bm)  # bytes counts too


@settings(max_examples=100, deadline=None)
@given(bitmaps)
def test_coco_rle_decode_uncompressed(bm: np.ndarray) -> None:
    # Uncompressed counts: column-major runs starting with background.
    flat = bm.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        runs = [0, *runs]
    rle = {"size": list(bm.shape), "counts": runs}
    assert np.array_equal(coco_rle_decode(rle).to_full(), bm)
    compressed = coco_mask.frPyObjects(rle, *bm.shape)
    assert compressed["counts"].decode() == coco_rle(RegionMask.from_full(bm))["counts"]


def test_coco_rle_empty() -> None:
    rle = coco_rle(RegionMask.empty(5, 4))
    assert rle == {
        "size": [4, 5],
        "counts": coco_mask.encode(np.zeros((4, 5), np.uint8, order="F"))["counts"].decode(),
    }
    assert coco_rle_decode(rle).is_empty


def test_coco_rle_large_counts_round_trip() -> None:
    bm = np.zeros((300, 400), bool)
    bm[10:290, 35:360] = True
    bm[100:120, 50:60] = False
    rle = coco_rle(RegionMask.from_full(bm))
    assert coco_rle_decode(rle) == RegionMask.from_full(bm)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [2, 3]}, "dict"),
        ([1, 2], "dict"),
        ({"size": [2], "counts": [6]}, "height, width"),
        ({"size": [0, 3], "counts": []}, "height"),
        ({"size": [2, 3], "counts": [1, 2]}, "sum to 3"),
        ({"size": [2, 3], "counts": [7, -1]}, "non-negative"),
        ({"size": [2, 3], "counts": "~~~"}, "invalid character"),
        ({"size": [2, 3], "counts": "1o"}, "truncated"),
        ({"size": [2, 3], "counts": 6}, "string"),
        ({"size": [2, 3], "counts": [2**62, 2**62, 2**62, 2**62 + 6]}, "more than the 6 pixels"),
    ],
)
def test_coco_rle_decode_validation(rle: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coco_rle_decode(rle)  # type: ignore[arg-type]


# -- polygons -------------------------------------------------------------------------------------------


def circle(h: int = 300, w: int = 400, cx: float = 180.3, cy: float = 140.7, r: float = 90) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def rectangle(h: int = 300, w: int = 400) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[40:211, 55:333] = True
    return m


def raster(polys: list[list[float]], w: int, h: int) -> np.ndarray:
    full = np.zeros((h, w), bool)
    for p in polys:
        full |= mask_from_polygon(p, w, h).to_full()
    return full


@pytest.mark.parametrize("make", [circle, rectangle])
def test_polygons_rasterise_back(make) -> None:  # noqa: ANN001
    bm = make()
    h, w = bm.shape
    m = RegionMask.from_full(bm)
    simplified, exact = polygons(m, 1.0), polygons(m, 0)
    assert len(simplified) == len(exact) == 1
    assert iou(raster(simplified, w, h), bm) >= 0.95
    assert iou(raster(exact, w, h), bm) >= 0.98
    assert np.array_equal(raster(exact, w, h), bm)  # pixel-centre vertices invert fillPoly exactly
    assert len(simplified[0]) <= len(exact[0])


def test_polygon_convention_pixel_centres_in_edge_coordinates() -> None:
    bm = np.zeros((10, 10), bool)
    bm[2:5, 3:7] = True  # columns 3..6, rows 2..4
    (poly,) = polygons(RegionMask.from_full(bm), 0)
    xs, ys = poly[0::2], poly[1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (3.5, 6.5, 2.5, 4.5)
    # Same rasterisation as OpenCV on the integer pixel-centre contour.
    cv = np.zeros((10, 10), np.uint8)
    cv2.fillPoly(cv, [np.array(poly).reshape(-1, 2).astype(np.int32)], 1)  # truncation = x - 0.5
    assert np.array_equal(cv.astype(bool), bm)


def test_polygons_empty_and_specks() -> None:
    assert polygons(RegionMask.from_full(np.zeros((5, 5), bool))) == []
    speck = np.zeros((5, 5), bool)
    speck[2, 2] = True
    assert polygons(RegionMask.from_full(speck)) == []  # fewer than 3 vertices


def test_polygons_multiple_components_largest_first() -> None:
    bm = np.zeros((100, 120), bool)
    bm[5:15, 5:15] = True  # 100 px
    bm[40:90, 30:100] = True  # 3500 px
    bm[20:30, 100:115] = True  # 150 px
    polys = polygons(RegionMask.from_full(bm), 1.0)
    assert len(polys) == 3
    firsts = [(min(p[0::2]), min(p[1::2])) for p in polys]
    assert firsts == [(30.5, 40.5), (100.5, 20.5), (5.5, 5.5)]
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)


def test_polygons_tolerance_validation() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        polygons(RegionMask.from_full(rectangle()), -1)


def test_mask_from_polygon_clips_and_validates() -> None:
    m = mask_from_polygon([-10, -10, 4.2, -10, 4.2, 4.2, -10, 4.2], 8, 8)
    assert m.bbox_xyxy_inclusive() == (0, 0, 4, 4)
    # Closed rasterisation: an edge exactly on a pixel edge also takes the pixel beyond it.
    assert mask_from_polygon([1, 1, 5, 1, 5, 5, 1, 5], 8, 8).bbox_xyxy_inclusive() == (1, 1, 5, 5)
    assert mask_from_polygon([20, 20, 30, 20, 30, 30], 8, 8).is_empty
    for bad, message in (
        ([0, 0, 1, 1], "at least 3 points"),
        ([0, 0, 1, 1, 2], "at least 3 points"),
        ([0, 0, 1, float("inf"), 2, 2], "finite"),
        ([0, 0, 1, 1, 2, 1e12], "within"),
        (["a", 0, 1, 1, 2, 2], "numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            mask_from_polygon(bad, 8, 8)


# -- shapes / render_mask -------------------------------------------------------------------------------


def test_render_mask_formats() -> None:
    m = RegionMask.from_full(doc_mask())
    out = render_mask(m, MASK_FORMATS, 1.0)
    assert set(out) == {"bbox", "area", *MASK_FORMATS}
    assert out["cvat"] == [0, 6, 2, 1, 4, 2]
    assert out["bbox"] == [2, 1, 3, 2] and out["area"] == 6
    assert out["coco_rle"] == coco_rle(m)
    assert out["polygons"] == polygons(m, 1.0)
    assert set(render_mask(m, ["cvat"], 1.0)) == {"bbox", "area", "cvat"}
    assert set(render_mask(m, "polygons", 0)) == {"bbox", "area", "polygons"}
    with pytest.raises(ValueError, match="valid formats: cvat, coco_rle, polygons"):
        render_mask(m, ["cvat", "bitmap_png"], 1.0)


def test_shape_validation_and_bounds() -> None:
    box = Shape("box", label="car", score=0.9, box=(1, 2, 11, 22))
    assert box.bounds() == (1, 2, 11, 22)
    rot = Shape("rotated_box", box=(0, 0, 10, 4), rotation=90)
    assert rot.bounds() == pytest.approx((3, -3, 7, 7))
    mask = Shape("mask", mask=RegionMask.from_full(doc_mask()))
    assert mask.bounds() == (2, 1, 5, 3)
    kps = Shape("keypoints", keypoints=[Keypoint("a", 1, 2), Keypoint("b", 9, 9, visible=False)])
    assert kps.bounds() == (1, 2, 1, 2)
    assert Shape("tag", label="indoor").bounds() is None
    for kwargs in (
        {"kind": "box"},
        {"kind": "box", "box": (0, 0, 1, 1), "polygon": [0, 0, 1, 0, 1, 1]},
        {"kind": "box", "box": (5, 0, 1, 1)},
        {"kind": "box", "box": (0, 0, 1, 1), "rotation": 30},
        {"kind": "polygon", "polygon": [0, 0, 1, 1]},
        {"kind": "tag", "box": (0, 0, 1, 1)},
        {"kind": "circle"},
        {"kind": "tag", "attributes": {"age": 31}},
    ):
        with pytest.raises(ValueError):
            Shape(**kwargs)  # type: ignore[arg-type]
