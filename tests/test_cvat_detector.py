"""Detectors through CVAT: the Nuclio detector function, and the AI-agent DetectionFunction checked by
cvat-sdk's own output validator (private API, cvat-sdk pinned to 2.80.0)."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import httpx
import PIL.Image
import pytest
from cvat_cli._internal.common import FunctionLoader
from cvat_sdk import models
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import encode_image, fall_checkpoint, make_settings, synthetic_scene, ultralytics_asset
from .test_cvat_nuclio import cvat_headers

AGENT = Path(__file__).parents[1] / "server" / "cvat" / "agent_functions.py"
BUS = ultralytics_asset("bus.jpg").read_bytes()


def test_detector_functions_are_listed_with_label_specs(detect_client: TestClient) -> None:
    functions = detect_client.get("/api/functions").json()
    spec = json.loads(functions["labelserve-fall"]["metadata"]["annotations"]["spec"])
    assert functions["labelserve-fall"]["metadata"]["annotations"]["type"] == "detector"
    assert [(label["name"], label["type"]) for label in spec] == [
        ("Normal", "rectangle"),
        ("Fall", "rectangle"),
    ]
    pose = json.loads(functions["labelserve-pose"]["metadata"]["annotations"]["spec"])
    skeleton = pose[0]
    assert (
        skeleton["type"] == "skeleton" and len(skeleton["sublabels"]) == 17 and "<circle" in skeleton["svg"]
    )
    assert len({label["name"] for label in pose}) == len(pose)  # CVAT requires unique label names
    tags = json.loads(functions["labelserve-cls"]["metadata"]["annotations"]["spec"])
    assert tags[0]["type"] == "tag"


def test_detector_invocation_and_threshold(detect_client: TestClient) -> None:
    payload = {"image": base64.b64encode(BUS).decode()}
    reply = detect_client.post(
        "/api/function_invocations", json=payload, headers=cvat_headers("labelserve-fall")
    )
    assert reply.status_code == 200
    items = reply.json()
    assert isinstance(items, list) and len(items) >= 3
    assert all(i["type"] == "rectangle" and i["label"] == "Normal" and len(i["points"]) == 4 for i in items)
    strict = detect_client.post(
        "/api/function_invocations",
        json={**payload, "threshold": 0.6},
        headers=cvat_headers("labelserve-fall"),
    ).json()
    assert 0 < len(strict) < len(items)
    wrong = detect_client.post(
        "/api/function_invocations", json={"pos_points": []}, headers=cvat_headers("labelserve-fall")
    )
    assert wrong.status_code == 422 and "image" in wrong.json()["error"]["message"]


def dataset_labels(spec_labels) -> list[models.Label]:
    """What a CVAT task with the function's labels looks like (dataset ids differ from the function's)."""
    labels = []
    for label in spec_labels:
        sublabels = [
            models.Sublabel(id=500 + s.id, name=s.name, type="points", attributes=[])
            for s in (label.get("sublabels") or [])
        ]
        labels.append(
            models.Label(
                id=100 + label.id,
                name=label.name,
                type=label.get("type") or "any",
                attributes=[],
                sublabels=sublabels,
            )
        )
    return labels


@pytest.mark.parametrize(
    ("model", "image"), [("fall", BUS), ("pose", encode_image(synthetic_scene(320, 240)))]
)
def test_agent_detection_function_passes_cvat_sdk_validation(
    live_server: str, model: str, image: bytes
) -> None:
    function = FunctionLoader(
        function_module=None, function_file=AGENT, function_parameters={"url": live_server, "model": model}
    ).load()
    pil = PIL.Image.open(io.BytesIO(image))
    context = _DetectionFunctionContextImpl(
        frame_name="f.jpg", conf_threshold=0.0 if model == "pose" else 0.3, conv_mask_to_poly=False
    )
    annotations = function.detect(context, pil)
    assert annotations
    mapper = _AnnotationMapper(
        logging.getLogger("test"),
        function.spec.labels,
        dataset_labels(function.spec.labels),
        allow_unmatched_labels=False,
        conv_mask_to_poly=False,
    )
    tags, shapes = mapper.validate_and_remap(annotations, ds_frame=3)
    assert len(tags) + len(shapes) == len(annotations)
    assert all(shape.frame == 3 and shape.label_id >= 100 for shape in shapes)
    if model == "pose":
        assert all(shape.type.value == "skeleton" and len(shape.elements) == 17 for shape in shapes)


# ---- sliced detection through CVAT (large images): the same tiles as the API's `tile` -------------------
def api_boxes(post, tile: int | None) -> list[list[float]]:  # noqa: ANN001
    body = {"image": {"base64": base64.b64encode(BUS).decode()}, "conf": 0.3}
    shapes = post("/v1/detect/fall", json=body | ({"tile": tile} if tile else {})).json()["shapes"]
    return sorted([round(v, 1) for v in s["box"]] for s in shapes)


def test_the_agent_function_slices_images_with_tile(live_server: str) -> None:
    function = FunctionLoader(
        function_module=None,
        function_file=AGENT,
        function_parameters={"url": live_server, "model": "fall", "tile": 512},
    ).load()
    context = _DetectionFunctionContextImpl(frame_name="f.jpg", conf_threshold=0.3, conv_mask_to_poly=False)
    found = sorted(
        [round(v, 1) for v in a.points] for a in function.detect(context, PIL.Image.open(io.BytesIO(BUS)))
    )
    with httpx.Client(base_url=live_server, timeout=120) as http:
        tiled, whole = api_boxes(http.post, 512), api_boxes(http.post, None)
    assert tiled != whole  # tiling changes the answer on this image, so the comparison below means something
    assert found == tiled


def test_nuclio_detectors_slice_images_with_the_cvat_detect_tile_setting(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        data_dir=tmp_path / "data",
        detector_paths={"fall": str(fall_checkpoint())},
        cvat_detect_tile=512,
    )
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        reply = client.post(
            "/api/function_invocations",
            json={"image": base64.b64encode(BUS).decode(), "threshold": 0.3},
            headers=cvat_headers("labelserve-fall"),
        )
        found = sorted([round(v, 1) for v in item["points"]] for item in reply.json())
        tiled, whole = api_boxes(client.post, 512), api_boxes(client.post, None)
    assert tiled != whole
    assert found == tiled
