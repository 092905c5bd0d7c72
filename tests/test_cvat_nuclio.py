"""CVAT Community's lambda manager talking to labelserve as if it were the Nuclio dashboard.

Payloads and headers are those of cvat/apps/lambda_manager/views.py (CVAT v2.73.0), as recorded in
../shared/docs/cvat-protocols.md; every reply is checked against the rules CVAT applies to it."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.api.routes.nuclio import BROWSER_SAM_ID
from server.app import create_app
from server.formats.rle import cvat_rle_decode

from .conftest import encode_image, make_settings, synthetic_scene

FRAME = encode_image(synthetic_scene(400, 300, seed=42))
FRAME_B64 = base64.b64encode(FRAME).decode()
INTERACTOR = "labelserve-mobile-sam"


def cvat_headers(function: str) -> dict[str, str]:
    """What LambdaGateway sends with every dashboard-mode invocation."""
    return {
        "x-nuclio-project-name": "cvat",
        "x-nuclio-function-namespace": "nuclio",
        "x-nuclio-invoke-via": "domain-name",
        "X-Nuclio-Invoke-Timeout": "120s",
        "x-nuclio-function-name": function,
        "x-nuclio-path": "/",
        "User-Agent": "CVAT/2.73.0 python-requests/2.32",
    }


def invoke(client: TestClient, function: str, payload: object):
    return client.post("/api/function_invocations", json=payload, headers=cvat_headers(function))


def check_cvat_mask_points(points: list[int], width: int, height: int) -> np.ndarray:
    *runs, xtl, ytl, xbr, ybr = points
    assert all(isinstance(v, int) and v >= 0 for v in points)
    assert 0 <= xtl <= xbr < width and 0 <= ytl <= ybr < height
    assert sum(runs) == (xbr - xtl + 1) * (ybr - ytl + 1)  # CVAT's own check
    return cvat_rle_decode(points, width, height).to_full()


@pytest.fixture(scope="module")
def browser_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """CVAT's browser decoder needs sam_vit_h weights; the plumbing is the same with any SAM model."""
    settings = make_settings(tmp_path_factory.mktemp("browser"), cvat_browser_sam_model="mobile_sam")
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        yield client


# ---- discovery ------------------------------------------------------------------------------------------
def test_function_list_is_an_object_with_every_key_cvat_reads(client: TestClient) -> None:
    functions = client.get("/api/functions").json()
    assert isinstance(functions, dict) and INTERACTOR in functions
    assert BROWSER_SAM_ID not in functions  # sam_vit_h is not loaded here
    for function_id, config in functions.items():
        assert re.fullmatch(r"[a-zA-Z0-9_.-]+", function_id)
        assert config["metadata"]["name"] == function_id
        annotations = config["metadata"]["annotations"]
        assert annotations["type"] in {"detector", "interactor", "tracker"}
        assert isinstance(config["spec"]["description"], str) and "status" in config
        assert all(isinstance(v, str) for v in annotations.values())
        assert "false" not in {v.lower() for v in annotations.values()}  # bool("false") is True in CVAT
        if annotations["type"] == "interactor":
            assert int(annotations["version"]) >= 2
            assert bool(annotations["startswith_box_optional"]) and int(annotations["min_pos_points"]) >= 0


def test_get_one_function_and_unknown_id(client: TestClient) -> None:
    assert client.get(f"/api/functions/{INTERACTOR}").json()["metadata"]["name"] == INTERACTOR
    response = client.get("/api/functions/no-such-function")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_function"


# ---- interactor -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bbox", ["absent", None, []])
def test_interactor_reply_and_obj_bbox_variants(client: TestClient, bbox: object) -> None:
    payload = {"image": FRAME_B64, "pos_points": [[120.0, 150.5]], "neg_points": [[300, 80]]}
    if bbox != "absent":
        payload["obj_bbox"] = bbox
    response = invoke(client, INTERACTOR, payload)
    assert response.status_code == 200, response.text
    shapes = response.json()["shapes"]
    assert len(shapes) == 1 and shapes[0]["type"] == "mask"
    check_cvat_mask_points(shapes[0]["points"], 400, 300)
    (attribute,) = shapes[0]["attributes"]
    assert attribute["spec_id"] == 0 and 0.0 <= float(attribute["value"]) <= 1.0


def test_interactor_matches_native_segment_and_hits_the_cache(client: TestClient) -> None:
    image_id = client.post("/v1/sam/mobile_sam/embed", content=FRAME, headers={"content-type": "image/png"})
    misses = client.get("/v1/cache/stats").json()["embeddings"]["misses"]
    payload = {
        "image": FRAME_B64,
        "pos_points": [[60, 40]],
        "neg_points": [],
        "obj_bbox": [[20, 10], [200, 160]],
    }
    cvat = invoke(client, INTERACTOR, payload).json()["shapes"][0]["points"]
    native = client.post(
        "/v1/sam/mobile_sam/segment",
        json={
            "image_id": image_id.json()["image_id"],
            "points": [[60, 40]],
            "box": [20, 10, 200, 160],
            "refine": False,
        },
    ).json()["masks"][0]["cvat"]
    assert cvat == native
    # Second and third clicks on the same frame: no new encode (the frame's bytes are the cache key).
    invoke(client, INTERACTOR, {**payload, "pos_points": [[60, 40], [70, 50]]})
    invoke(client, INTERACTOR, {**payload, "neg_points": [[5, 5]]})
    assert client.get("/v1/cache/stats").json()["embeddings"]["misses"] == misses


def test_legacy_reply_for_cvat_before_2_60(tmp_path) -> None:
    settings = make_settings(tmp_path, cvat_interactor_reply="legacy")
    with TestClient(create_app(settings, load_models_in_background=False)) as legacy:
        payload = {"image": FRAME_B64, "pos_points": [[120, 150]], "neg_points": []}
        mask = np.array(invoke(legacy, INTERACTOR, payload).json()["mask"])
        shapes_mode = legacy.post(
            "/v1/sam/mobile_sam/segment",
            json={"image": {"base64": FRAME_B64}, "points": [[120, 150]], "refine": False},
        ).json()["masks"][0]["cvat"]
    assert mask.shape == (300, 400) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, check_cvat_mask_points(shapes_mode, 400, 300))


def test_browser_plugin_gets_the_float32_embedding(browser_client: TestClient) -> None:
    assert BROWSER_SAM_ID in browser_client.get("/api/functions").json()
    response = invoke(
        browser_client, BROWSER_SAM_ID, {"image": FRAME_B64, "pos_points": [], "neg_points": []}
    )
    assert response.status_code == 200
    blob = np.frombuffer(base64.b64decode(response.json()["blob"]), dtype="<f4")
    assert blob.size == 1 * 256 * 64 * 64
    services = browser_client.app.state.services
    image_id = browser_client.post(
        "/v1/sam/mobile_sam/embed", content=FRAME, headers={"content-type": "image/png"}
    ).json()["image_id"]
    cached = services.sam.cached_embedding("mobile_sam", image_id).embedding["image_embed"].float().numpy()
    assert np.array_equal(blob.reshape(1, 256, 64, 64), cached)


# ---- what CVAT shows the user when something is wrong ---------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"pos_points": [[1, 1]], "neg_points": []}, 422, "invalid_request"),  # no image
        ({"image": "@@@", "pos_points": [[1, 1]], "neg_points": []}, 400, "bad_base64"),
        ({"image": FRAME_B64, "threshold": 0.5}, 422, "invalid_request"),  # a detector payload
        ({"image": FRAME_B64, "pos_points": [[900, 1]], "neg_points": []}, 422, "prompt_outside_image"),
        ({"image": FRAME_B64, "pos_points": [], "neg_points": []}, 422, "no_prompt"),
        ({"image": FRAME_B64, "pos_points": [], "neg_points": [], "obj_bbox": [[1, 1]]}, 422, "bad_prompt"),
        ([1, 2, 3], 422, "invalid_request"),
    ],
)
def test_bad_invocations_get_clear_4xx(client: TestClient, payload: object, status: int, code: str) -> None:
    response = invoke(client, INTERACTOR, payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_unknown_function_and_missing_header(client: TestClient) -> None:
    assert invoke(client, "nope", {"image": FRAME_B64}).status_code == 404
    response = client.post("/api/function_invocations", json={"image": FRAME_B64})
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_function_name"
    bad_json = client.post("/api/function_invocations", content=b"{", headers=cvat_headers(INTERACTOR))
    assert bad_json.status_code == 400
