"""Fuzzing: every operation in the OpenAPI schema (schemathesis); CVAT's Nuclio invocations, the prompt parser
and the mask codecs (hypothesis). Over HTTP, whatever comes in gets a documented 2xx or 4xx, never a 5xx;
the parser and decoders raise only their validation errors and never crash the process; the codecs
round-trip. Inputs tried are tallied and printed at the end, for the README's Reliability table. Example
counts are bounded: the module takes about a minute on 2 cores."""

from __future__ import annotations

import base64
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from models.sam3 import TINY_CONFIG, sam3_config
from models.shapes import RegionMask, mask_from_polygon, polygons
from server.app import create_app
from server.errors import ApiError
from server.formats.rle import coco_rle, coco_rle_decode, cvat_rle, cvat_rle_decode
from server.schemas import SegmentRequest
from server.services.sam import build_prompt

from .conftest import encode_image, make_settings, synthetic_scene

# Every operation, so that a new endpoint fails test_every_operation_is_fuzzed until it is listed here.
OPERATIONS = (
    "POST /v1/sam/{model}/embed",
    "POST /v1/sam/{model}/segment",
    "POST /v1/concepts/{model}",
    "POST /v1/detect/{model}",
    "GET /v1/trackers",
    "POST /v1/track/{tracker}",
    "POST /v1/track/{tracker}/step",
    "DELETE /v1/track/{tracker}/states/{state}",
    "POST /v1/track/{tracker}/propagate",
    "POST /v1/video/frame",
    "GET /v1/models",
    "POST /v1/models/{model}/load",
    "POST /v1/models/{model}/unload",
    "GET /v1/cache/stats",
    "DELETE /v1/cache",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /api/functions",
    "GET /api/functions/{function_id}",
    "POST /api/function_invocations",
    "POST /v1/jobs",
    "GET /v1/jobs",
    "GET /v1/jobs/{job_id}",
    "DELETE /v1/jobs/{job_id}",
    "POST /v1/jobs/{job_id}/resume",
    "POST /v1/corrections",
    "POST /v1/prefetch",
    "GET /v1/prefetch",
    "GET /v1/prefetch/{run_id}",
    "DELETE /v1/prefetch/{run_id}",
    "POST /v1/cvat/webhooks/{profile}",
    "POST /v1/cvat/lookahead",
    "GET /v1/whoami",
    "GET /v1/storage",
    "GET /v1/storage/list",
    "GET /v1/storage/object",
)
EXAMPLES_PER_MODE = 15  # per operation, once with schema-valid and once with schema-violating inputs
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def bounded(examples: int) -> settings:
    # No deadline: a request can wait on an encode; no health checks: `steer` draws conditionally.
    return settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )


# What the tests tried, printed once the module is done: {group: count}. A 5xx fails its test.
TRIED: Counter[str] = Counter()
ANSWERS: Counter[str] = Counter()  # status classes of the HTTP answers: how deep the requests got


class LifespanElsewhere:
    """The app minus its lifespan, for schemathesis: its pytest plugin ends ASGI lifespans after every test,
    and the app's job engine, once closed, stays closed. The fixture runs the real lifespan once."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return


class FuzzTarget:
    """The app under fuzzing, with the names and inputs that let generated requests get past 404s."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", LifespanElsewhere(client.app))
        self.png_base64 = base64.b64encode(encode_image(synthetic_scene(48, 32))).decode()
        embedded = client.post("/v1/sam/mobile_sam/embed", json={"image": {"base64": self.png_base64}})
        assert embedded.status_code == 200, embedded.text
        self.image_id = embedded.json()["image_id"]
        self.names = {
            "model": ["mobile_sam", "det", "sam3"],
            "tracker": [t["name"] for t in client.get("/v1/trackers").json()["trackers"]],
            "function_id": list(client.get("/api/functions").json()),
        }


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # A random-init YOLO11n next to MobileSAM: detection and the CVAT detector paths run for real. "spare"
    # is what the load and unload operations get, so that they never unload what the others use.
    detectors = {"det": "yolo11n.yaml", "spare": "yolo11n.yaml"}
    sam3_config(TINY_CONFIG).save_pretrained(tmp / "weights" / "sam3")  # a small SAM 3: concepts run for real
    settings = make_settings(
        tmp, data_dir=tmp / "data", detector_paths=detectors, models=["mobile_sam", "sam3"]
    )
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        yield FuzzTarget(client)


@pytest.fixture(scope="module", autouse=True)
def report_tally(request: pytest.FixtureRequest) -> Iterator[None]:
    TRIED.clear()
    ANSWERS.clear()
    yield
    figures = ", ".join(f"{group}: {count}" for group, count in sorted(TRIED.items()))
    answers = ", ".join(f"{status}: {count}" for status, count in sorted(ANSWERS.items()))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nfuzz inputs tried (none answered 5xx or crashed): {figures}; HTTP answers: {answers}")


def test_every_operation_is_fuzzed(target: FuzzTarget) -> None:
    labels = {result.ok().label for result in target.schema.get_all_operations()}
    assert labels == set(OPERATIONS)


trackable_shapes = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["rectangle", "polygon", "mask"]),
        "points": st.lists(st.floats(-10, 60) | st.integers(0, 48), min_size=0, max_size=12),
    }
)


def steer(case: schemathesis.Case, data: st.DataObject, target: FuzzTarget) -> None:
    """Swap in real names and a decodable image some of the time: random strings alone only ever reach the
    404 for an unknown model and the 4xx for undecodable bytes."""
    names = (
        {**target.names, "model": ["spare"]}
        if case.operation.path.startswith("/v1/models/")
        else target.names
    )
    for name, known in names.items():
        if name in (case.path_parameters or {}) and data.draw(st.integers(0, 3), label="real name") > 0:
            case.path_parameters[name] = data.draw(st.sampled_from(known), label=name)
    if "x-nuclio-function-name" in (case.headers or {}) and data.draw(st.booleans(), label="real function"):
        case.headers["x-nuclio-function-name"] = data.draw(st.sampled_from(target.names["function_id"]))
    body = case.body
    if not isinstance(body, dict):
        return
    image_key = next((key for key in ("image", "image_id", "video") if key in body), None)
    if image_key is not None:
        choice = data.draw(st.sampled_from(["generated", "png", "image_id"]), label="image")
        if choice == "png" or (choice == "image_id" and "segment" not in case.operation.path):
            body.pop("image_id", None)
            body["video" if image_key == "video" else "image"] = {"base64": target.png_base64}
        elif choice == "image_id":
            body.pop("image", None)
            body["image_id"] = target.image_id
    if "shapes" in body and data.draw(st.booleans(), label="trackable shapes"):
        body["shapes"] = data.draw(st.lists(trackable_shapes, min_size=1, max_size=3), label="shapes")
    if isinstance(body.get("imgsz"), int):
        body["imgsz"] = min(body["imgsz"], 256)  # a 4096-pixel forward pass takes seconds on a CPU


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_operation_never_answers_5xx(target: FuzzTarget, label: str) -> None:
    operation = target.schema.find_operation_by_label(label)
    assert operation is not None
    # Schema-violating inputs need something with a type or bounds to violate: a body or a query. Any path
    # segment is a valid string, so path-only operations get schema-valid inputs only.
    violable = bool(operation.query or operation.body)
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if violable else [])
    for mode in modes:

        @bounded(EXAMPLES_PER_MODE)
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        def run(case: schemathesis.Case, data: st.DataObject) -> None:
            steer(case, data, target)
            response = case.call_and_validate(checks=CHECKS)
            TRIED["API requests"] += 1
            ANSWERS[f"{response.status_code // 100}xx"] += 1

        run()


# ---- CVAT's Nuclio invocations: the body is free-form JSON, which the schema cannot describe ----------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
coordinates = st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-5, 60)
points = st.lists(st.tuples(coordinates, coordinates), max_size=3)


def invocation_payloads(png_base64: str) -> st.SearchStrategy[Any]:
    image = st.sampled_from([png_base64, "not base64", ""]) | st.text(max_size=6)
    interactor = st.fixed_dictionaries(
        {"image": image, "pos_points": points, "neg_points": points},
        optional={"obj_bbox": st.lists(st.tuples(coordinates, coordinates), max_size=3) | st.none()},
    )
    detector = st.fixed_dictionaries(
        {"image": image}, optional={"threshold": st.floats(-1, 2) | st.none() | st.text(max_size=3)}
    )
    tracker = st.fixed_dictionaries(
        {"image": image},
        optional={
            "shapes": st.lists(
                trackable_shapes | st.lists(coordinates, max_size=5) | json_values, max_size=3
            ),
            "states": st.lists(st.text(max_size=8) | st.none() | st.integers(), max_size=3),
        },
    )
    return interactor | detector | tracker | json_values


@bounded(120)
@given(data=st.data())
def test_nuclio_invocations_never_answer_5xx(target: FuzzTarget, data: st.DataObject) -> None:
    function_id = data.draw(st.sampled_from(target.names["function_id"]), label="function")
    payload = data.draw(invocation_payloads(target.png_base64), label="payload")
    response = target.client.post(
        "/api/function_invocations", json=payload, headers={"x-nuclio-function-name": function_id}
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]
    TRIED["Nuclio invocations"] += 1
    ANSWERS[f"{response.status_code // 100}xx"] += 1


# ---- SegmentRequest parsing and build_prompt, with any floats ---------------------------------------------
any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 2.0**62])


@bounded(300)
@given(
    raw_points=st.lists(st.lists(any_float, min_size=1, max_size=3), max_size=4),
    labels=st.none() | st.lists(st.integers(-2, 3) | st.sampled_from([2**40]), max_size=5),
    box=st.none() | st.lists(any_float, min_size=3, max_size=5),
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
)
def test_prompt_parsing_raises_only_client_errors(
    raw_points: list[list[float]], labels: list[int] | None, box: list[float] | None, width: int, height: int
) -> None:
    TRIED["prompt parses"] += 1
    try:
        request = SegmentRequest.model_validate(
            {"image_id": "x", "points": raw_points, "labels": labels, "box": box}
        )
        prompt = build_prompt(request, width, height)
    except ValidationError:
        return
    except ApiError as exc:
        assert exc.status == 422 and exc.code in {"bad_prompt", "prompt_outside_image", "no_prompt"}
        return
    # Accepted: finite clicks inside the image, a box clipped into it, one 0/1 label per click.
    assert all(math.isfinite(v) for v in prompt.points.ravel())
    assert np.all((prompt.points >= 0) & (prompt.points <= [width, height]))
    assert len(prompt.labels) == len(prompt.points) and set(prompt.labels.tolist()) <= {0, 1}
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box.tolist()
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    else:
        assert len(prompt.points)


# ---- mask codecs: round trips over any region mask, and decoders fed anything ------------------------------
@st.composite
def region_masks(draw: st.DrawFn) -> RegionMask:
    """Masks of every shape the pipeline makes: empty, full, 1×N, N×1, 0-sized, offset inside a larger
    image."""
    h, w = draw(st.integers(0, 14)), draw(st.integers(0, 14))
    fill = draw(st.sampled_from(["random", "empty", "full"]))
    if fill == "random":
        bitmap = draw(arrays(np.bool_, (h, w), elements=st.booleans()))
    else:
        bitmap = np.full((h, w), fill == "full")
    x0, y0 = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    width = max(1, x0 + w + draw(st.integers(0, 6)))
    height = max(1, y0 + h + draw(st.integers(0, 6)))
    return RegionMask(bitmap, x0, y0, width, height)


@bounded(300)
@given(region_masks())
def test_cvat_rle_round_trips_any_region_mask(mask: RegionMask) -> None:
    TRIED["codec examples"] += 1
    points = cvat_rle(mask)
    runs, box = points[:-4], points[-4:]
    decoded = cvat_rle_decode(points, mask.image_width, mask.image_height)
    assert decoded == mask and decoded.area() == mask.area()
    if mask.is_empty:
        assert points == [0, 0, 0, 0, 0]
    else:
        xtl, ytl, xbr, ybr = box
        assert sum(runs) == (xbr - xtl + 1) * (ybr - ytl + 1) and runs[-1] > 0
        assert tuple(box) == mask.bbox_xyxy_inclusive()
    # JSON numbers may arrive as floats.
    assert cvat_rle_decode([float(v) for v in points], mask.image_width, mask.image_height) == mask


@bounded(300)
@given(region_masks())
def test_coco_rle_round_trips_any_region_mask(mask: RegionMask) -> None:
    TRIED["codec examples"] += 1
    rle = coco_rle(mask)
    assert rle["size"] == [mask.image_height, mask.image_width]
    assert coco_rle_decode(rle) == mask
    assert coco_rle_decode({"size": rle["size"], "counts": rle["counts"].encode()}) == mask


def holes_filled(bitmap: np.ndarray) -> np.ndarray:
    """Everything background cannot reach from outside (4-connected, as 8-connected foreground walls)."""
    padded = np.pad(bitmap, 1).astype(np.uint8)
    cv2.floodFill(padded, None, (0, 0), 2, flags=4)
    return (padded != 2)[1:-1, 1:-1]


def polygon_components(bitmap: np.ndarray) -> np.ndarray:
    """The 8-connected components an outline can describe: not a lone pixel or a straight 1-pixel line."""
    count, labels = cv2.connectedComponents(bitmap.astype(np.uint8), connectivity=8)
    kept = np.zeros_like(bitmap)
    for label in range(1, count):
        ys, xs = np.nonzero(labels == label)
        offsets = np.stack([xs - xs[0], ys - ys[0]], axis=1)
        if np.linalg.matrix_rank(offsets) > 1:
            kept |= labels == label
    return kept


@bounded(300)
@given(region_masks())
def test_polygons_rasterise_to_the_mask_they_outline(mask: RegionMask) -> None:
    """polygons(m) → mask_from_polygon: every component that has an outline comes back exactly, holes
    filled (outlines are outer contours only), nothing outside; and outlining that again changes nothing."""
    TRIED["codec examples"] += 1
    outlines = polygons(mask, 0)
    raster = np.zeros((mask.image_height, mask.image_width), bool)
    for outline in outlines:
        raster |= mask_from_polygon(outline, mask.image_width, mask.image_height).to_full()
    full = mask.to_full()
    assert not (polygon_components(full) & ~raster).any(), "an outlined pixel was lost"
    assert not (raster & ~holes_filled(full)).any(), "a pixel outside every outline was set"
    assert polygons(RegionMask.from_full(raster), 0) == outlines


junk = st.recursive(
    st.none() | st.booleans() | st.text(max_size=3) | st.floats() | st.integers(),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)
# Run lengths near 2**62 and 2**63 reach the int64 overflow that once crashed the decoder.
run_values = st.integers(0, 40) | st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64, -1])
image_sides = st.integers(-2, 40) | st.sampled_from([0, 2**31, 10**9]) | junk


@bounded(500)
@given(
    points=st.lists(run_values | st.floats() | junk, max_size=12) | junk,
    width=image_sides,
    height=image_sides,
)
@example(points=[2**62, 2**62, 2**62, 2**62 + 6, 2, 1, 4, 2], width=6, height=5)
@example(points=[2.0**62] * 4 + [1.0, 0, 0, 0, 0], width=6, height=5)
def test_cvat_rle_decode_refuses_garbage_with_value_error(points: Any, width: Any, height: Any) -> None:
    TRIED["codec examples"] += 1
    try:
        mask = cvat_rle_decode(points, width, height)
    except ValueError:
        return
    assert (mask.image_width, mask.image_height) == (width, height)
    assert mask.to_full().shape == (height, width)


@bounded(500)
@given(
    rle=st.fixed_dictionaries(
        {"size": st.lists(image_sides, max_size=3) | junk},
        optional={
            "counts": st.lists(run_values, max_size=8) | st.text(max_size=12) | st.binary(max_size=8) | junk
        },
    )
    | junk
)
@example(rle={"size": [2, 3], "counts": [2**62, 2**62, 2**62, 2**62 + 6]})
def test_coco_rle_decode_refuses_garbage_with_value_error(rle: Any) -> None:
    TRIED["codec examples"] += 1
    try:
        mask = coco_rle_decode(rle)
    except ValueError:
        return
    assert mask.to_full().shape == tuple(rle["size"])


@bounded(300)
@given(
    points=st.lists(st.floats() | st.integers() | junk, max_size=10) | junk,
    width=image_sides,
    height=image_sides,
)
def test_mask_from_polygon_refuses_garbage_with_value_error(points: Any, width: Any, height: Any) -> None:
    TRIED["codec examples"] += 1
    try:
        mask = mask_from_polygon(points, width, height)
    except ValueError:
        return
    assert mask.to_full().shape == (height, width)
