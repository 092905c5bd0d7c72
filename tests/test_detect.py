"""YOLO detection: real weights find the people in bus.jpg and zidane.jpg, outputs equal a plain ultralytics
predict, masks match ultralytics' own, concurrent requests share forward passes, bad input gets 4xx."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from ultralytics import YOLO
from ultralytics.engine.results import Results
from ultralytics.utils import ops

from models.detector import DetectorInfo
from models.yolo import shapes_from_result
from server.inputs.images import decode_image

from .conftest import encode_image, fall_checkpoint, synthetic_scene, ultralytics_asset

# People in bus.jpg (x1, y1, x2, y2), read off the image: the three men standing in front of the bus.
BUS_PEOPLE = [(50, 400, 245, 905), (220, 405, 345, 860), (670, 380, 810, 880)]


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def detect(client: TestClient, model: str, data: bytes, **params):
    return client.post(
        f"/v1/detect/{model}",
        files={"file": ("image", data, "application/octet-stream")},
        data={"params": json.dumps(params)},
    )


def test_real_checkpoint_finds_the_people_in_bus_jpg(detect_client: TestClient) -> None:
    response = detect(detect_client, "fall", ultralytics_asset("bus.jpg").read_bytes())
    assert response.status_code == 200 and response.headers["x-labelserve-weights"] == "checkpoint"
    body = response.json()
    assert (body["width"], body["height"], body["task"]) == (810, 1080, "detect")
    boxes = [s["box"] for s in body["shapes"] if s["label"] == "Normal"]
    for person in BUS_PEOPLE:
        assert max(box_iou(person, box) for box in boxes) >= 0.5, person


def test_detections_equal_plain_ultralytics_predict(detect_client: TestClient) -> None:
    reference = YOLO(str(fall_checkpoint()))
    for asset in ("bus.jpg", "zidane.jpg"):
        data = ultralytics_asset(asset).read_bytes()
        ours = detect(detect_client, "fall", data).json()["shapes"]
        image = decode_image(data, 10**9)
        result = reference.predict(image[:, :, ::-1].copy(), verbose=False)[0]
        torch.set_num_threads(2)
        expected = result.boxes.xyxy.tolist()
        assert len(ours) == len(expected) >= 2, asset
        for shape, box, conf in zip(ours, expected, result.boxes.conf.tolist(), strict=True):
            assert np.allclose(shape["box"], box, atol=1e-2) and abs(shape["score"] - conf) < 1e-4


def test_pose_obb_and_classify_equal_the_models_own_predict(detect_client: TestClient) -> None:
    data = encode_image(synthetic_scene(320, 240, seed=8))
    bgr = decode_image(data, 10**9)[:, :, ::-1].copy()
    registry = detect_client.app.state.services.registry

    def reference(model: str):
        result = registry.detector(model).model.predict(bgr, conf=0.0, max_det=3, verbose=False)[0]
        torch.set_num_threads(2)
        return result

    pose = detect(detect_client, "pose", data, conf=0.0, max_det=3).json()
    assert pose["task"] == "pose" and len(pose["shapes"]) == 3
    expected = reference("pose").keypoints.xy.numpy()
    for shape, points in zip(pose["shapes"], expected, strict=True):
        assert shape["kind"] == "keypoints" and [k["name"] for k in shape["keypoints"]][:2] == [
            "nose",
            "left_eye",
        ]
        assert np.allclose([[k["x"], k["y"]] for k in shape["keypoints"]], points, atol=1e-3)
    obb = detect(detect_client, "obb", data, conf=0.0, max_det=3).json()
    expected_obb = reference("obb").obb.xywhr.numpy()
    assert len(obb["shapes"]) == len(expected_obb) > 0
    for shape, (cx, cy, w, h, r) in zip(obb["shapes"], expected_obb, strict=True):
        assert shape["kind"] == "rotated_box" and abs(shape["rotation"] - np.degrees(r)) < 1e-3
        assert np.allclose(shape["box"], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-2)
    tags = detect(detect_client, "cls", data, conf=0.9).json()
    assert [s["kind"] for s in tags["shapes"]] == ["tag"]  # the top class even below conf
    assert (
        tags["shapes"][0]["label"]
        == registry.detector("cls").info.class_names[int(reference("cls").probs.top1)]
    )


def test_cvat_rendering(detect_client: TestClient) -> None:
    body = detect(detect_client, "fall", ultralytics_asset("bus.jpg").read_bytes(), format="cvat").json()
    assert all(s["type"] == "rectangle" and len(s["points"]) == 4 for s in body["shapes"])
    pose = detect(
        detect_client,
        "pose",
        encode_image(synthetic_scene(320, 240, seed=8)),
        conf=0.0,
        max_det=2,
        format="cvat",
    ).json()
    assert pose["shapes"][0]["type"] == "skeleton" and len(pose["shapes"][0]["elements"]) == 17


def test_segment_masks_match_ultralytics_scaling() -> None:
    """Masks at inference size → original size inside their box, against ultralytics' own full rescale."""
    height, width = 300, 500
    in_h, in_w = 384, 640  # letterboxed inference size
    rng = np.random.default_rng(0)
    masks = np.zeros((2, in_h, in_w), np.float32)
    masks[0, 100:200, 150:400] = 1
    masks[1, 60:300, 300:520] = rng.random((240, 220)) > 0.3
    boxes = torch.tensor([[120, 70, 445, 230, 0.9, 0], [250, 20, 500, 300, 0.8, 1]], dtype=torch.float32)
    result = Results(
        np.zeros((height, width, 3), np.uint8),
        path="x",
        names={0: "a", 1: "b"},
        boxes=boxes,
        masks=torch.from_numpy(masks),
    )
    shapes = shapes_from_result(result, DetectorInfo("m", "segment", {0: "a", 1: "b"}), 0.25)
    full = ops.scale_masks(torch.from_numpy(masks)[None], (height, width))[0].numpy() > 0.5
    for shape, reference, box in zip(shapes, full, boxes.numpy(), strict=True):
        x0, y0, x1, y1 = (int(v) for v in box[:4])
        ours = shape.mask.to_full()[y0:y1, x0:x1]
        expected = reference[y0:y1, x0:x1]
        assert (ours & expected).sum() / max((ours | expected).sum(), 1) >= 0.97
        assert not shape.mask.to_full()[:, :x0].any() and not shape.mask.to_full()[:y0].any()


def test_concurrent_requests_share_forward_passes(detect_client: TestClient) -> None:
    data = ultralytics_asset("bus.jpg").read_bytes()
    expected = detect(detect_client, "fall", data).json()["shapes"]
    stats = detect_client.app.state.services.detect.batcher("fall").stats
    before_batches, before_items = stats.batches, stats.items
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: detect(detect_client, "fall", data).json()["shapes"], range(6)))
    assert stats.items - before_items == 6
    assert stats.batches - before_batches < 6 and stats.largest > 1
    for shapes in replies:  # batching changes nothing in the answer
        assert [s["label"] for s in shapes] == [s["label"] for s in expected]
        assert np.allclose([s["box"] for s in shapes], [s["box"] for s in expected], atol=0.5)


def test_sam_refinement_turns_boxes_into_masks(detect_client: TestClient) -> None:
    data = ultralytics_asset("bus.jpg").read_bytes()
    body = detect_client.post(
        "/v1/detect/fall",
        json={
            "image": {"base64": base64.b64encode(data).decode()},
            "sam_refine": "mobile_sam",
            "mask_formats": ["cvat"],
        },
    ).json()
    assert body["shapes"] and all(s["kind"] == "mask" and s["mask"]["area"] > 0 for s in body["shapes"])
    again = detect_client.post(
        "/v1/detect/fall",
        json={"image": {"base64": base64.b64encode(data).decode()}, "sam_refine": "mobile_sam"},
    )
    assert "encode" not in again.json()["timings_ms"]  # the SAM embedding came from the cache


def test_a_jobs_sam_refinement_encodes_behind_clicks(detect_client: TestClient, tmp_path) -> None:  # noqa: ANN001
    """Batch jobs must not compete with annotators: their SAM encodes go at background priority."""
    images = tmp_path / "images"
    images.mkdir()
    bus = decode_image(ultralytics_asset("bus.jpg").read_bytes(), 10**8)
    for i in range(2):  # distinct pixels (not bus.jpg's own), so neither embedding is in the cache yet
        (images / f"bus{i}.png").write_bytes(encode_image(np.ascontiguousarray(bus[:, i + 1 :])))

    def done() -> dict[str, int]:
        encoders = detect_client.get("/v1/cache/stats").json()["encoders"]
        return encoders.get("mobile_sam", {}).get("done", {"interactive": 0, "background": 0})

    before = done()
    spec = {
        "source": {"directory": str(images)},
        "detector": "fall",
        "sam_refine": "mobile_sam",
        "output": {"format": "cvat_images", "directory": str(tmp_path / "out")},
    }
    created = detect_client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 120
    while (status := detect_client.get(f"/v1/jobs/{created.json()['id']}").json())["state"] != "completed":
        assert time.monotonic() < deadline and status["state"] in ("queued", "running"), status
        time.sleep(0.1)
    after = done()
    assert after["background"] - before["background"] == 2
    assert after["interactive"] == before["interactive"]
    assert b"<mask" in (tmp_path / "out" / "annotations.xml").read_bytes()  # the boxes became masks


@pytest.mark.parametrize(
    ("model", "params", "status", "code"),
    [
        ("nope", {}, 404, "unknown_model"),
        ("mobile_sam", {}, 404, "unknown_model"),  # a segmenter is not a detector
        ("fall", {"classes": [7]}, 422, "unknown_class"),
        ("fall", {"conf": 1.5}, 422, "invalid_request"),
        ("fall", {"format": "voc"}, 422, "invalid_request"),
        ("fall", {"sam_refine": "nope"}, 404, "unknown_model"),
    ],
)
def test_bad_detection_requests(detect_client: TestClient, model: str, params: dict, status: int, code: str):
    response = detect(detect_client, model, encode_image(synthetic_scene(64, 48)), **params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_corrupt_image_and_missing_file(detect_client: TestClient) -> None:
    assert detect(detect_client, "fall", b"\xff\xd8\xff garbage").status_code in (400, 415)
    response = detect_client.post(
        "/v1/detect/fall", files={"other": ("a", b"x", "text/plain")}, data={"params": "{}"}
    )
    assert response.status_code == 422 and "image" in response.json()["error"]["message"]
