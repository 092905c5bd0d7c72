"""Every bad input gets a clear 4xx {"error": {"code", "message"}} and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.errors import ApiError
from server.inputs.images import decode_image

from .conftest import encode_image, make_settings, synthetic_scene

MAX = 64_000_000


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10
    return error


@pytest.fixture(scope="module")
def image_id(client: TestClient) -> str:
    response = client.post(
        "/v1/sam/mobile_sam/embed",
        content=encode_image(synthetic_scene(64, 48)),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200
    return response.json()["image_id"]


def segment(client: TestClient, payload: dict):
    return client.post("/v1/sam/mobile_sam/segment", json=payload)


# ---- image bytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"this is not an image at all", 415, "unsupported_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 415, "unsupported_image"),
    ],
)
def test_non_images_are_refused(client: TestClient, data: bytes, status: int, code: str) -> None:
    response = client.post("/v1/sam/mobile_sam/embed", content=data, headers={"content-type": "image/jpeg"})
    assert_error(response, status, code)


def test_truncated_jpeg_is_refused(client: TestClient, bus_jpg: bytes) -> None:
    response = client.post(
        "/v1/sam/mobile_sam/embed",
        content=bus_jpg[: len(bus_jpg) // 2],
        headers={"content-type": "image/jpeg"},
    )
    assert_error(response, 400, "corrupt_image")


def test_zero_size_image_is_refused() -> None:
    png = encode_image(np.zeros((1, 1, 3), np.uint8))
    zero_width = png[:16] + (0).to_bytes(4, "big") + png[20:]  # IHDR width field
    with pytest.raises(ApiError) as error:
        decode_image(zero_width, MAX)
    assert error.value.status in (400, 415)


def test_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("L", (10_000, 7_000)).save(buffer, format="PNG")  # 70 MP of zeros compresses to ~70 kB
    response = client.post(
        "/v1/sam/mobile_sam/embed", content=buffer.getvalue(), headers={"content-type": "image/png"}
    )
    assert_error(response, 413, "image_too_large")


# ---- image modes are converted, not refused ------------------------------------------------------
def _save(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_cmyk_rgba_palette_grayscale_and_16_bit_become_rgb() -> None:
    rgb = synthetic_scene(40, 30)
    base = Image.fromarray(rgb)
    cases = {
        "CMYK": _save(base.convert("CMYK"), "JPEG"),
        "RGBA": _save(base.convert("RGBA")),
        "P": _save(base.convert("P")),
        "L": _save(base.convert("L")),
        "LA": _save(base.convert("LA")),
        "I;16": _save(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)),
    }
    for mode, data in cases.items():
        array = decode_image(data, MAX)
        assert array.shape == (30, 40, 3) and array.dtype == np.uint8, mode
    assert np.array_equal(decode_image(cases["RGBA"], MAX), rgb)
    sixteen = decode_image(cases["I;16"], MAX)
    assert np.array_equal(sixteen[:, :, 0], rgb[:, :, 0]) and np.array_equal(sixteen[:, :, 2], rgb[:, :, 0])


def test_exif_orientation_is_applied() -> None:
    upright = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high: red left half, blue right, green top band
    upright[:, :30] = (220, 0, 0)
    upright[:, 30:] = (0, 0, 220)
    upright[:8] = (0, 220, 0)
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # stored 90° counter-clockwise: 40 wide, 60 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    decoded = decode_image(buffer.getvalue(), MAX)
    assert decoded.shape == (40, 60, 3)
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 8


# ---- bodies --------------------------------------------------------------------------------------
def test_bad_base64(client: TestClient) -> None:
    response = client.post("/v1/sam/mobile_sam/embed", json={"image": {"base64": "***not base64***"}})
    assert_error(response, 400, "bad_base64")


def test_empty_json_body(client: TestClient) -> None:
    response = client.post(
        "/v1/sam/mobile_sam/embed", content=b"", headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422) and "error" in response.json()


def test_malformed_json(client: TestClient) -> None:
    response = client.post(
        "/v1/sam/mobile_sam/segment", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")


def test_unsupported_content_type(client: TestClient) -> None:
    response = client.post(
        "/v1/sam/mobile_sam/embed", content=b"hello", headers={"content-type": "text/plain"}
    )
    assert_error(response, 415, "unsupported_media_type")


def test_multipart_without_file(client: TestClient) -> None:
    response = client.post("/v1/sam/mobile_sam/embed", files={"other": ("a.txt", b"abc", "text/plain")})
    assert_error(response, 400, "missing_image")


def test_unknown_model(client: TestClient) -> None:
    assert_error(
        client.post("/v1/sam/nope/embed", content=b"x", headers={"content-type": "image/png"}),
        404,
        "unknown_model",
    )


@pytest.mark.parametrize(("model", "kind"), [("yolo11n", "detector"), ("medianflow", None)])
def test_click_on_a_model_without_a_click_head(client: TestClient, model: str, kind: str | None) -> None:
    """A detector, or a tracker that is no model: a 404 saying what the name is, before the image is read."""
    for path in (f"/v1/sam/{model}/segment", f"/v1/sam/{model}/embed"):
        error = assert_error(client.post(path, json={"image_id": "0" * 64}), 404, "unknown_model")
        assert (f"is a {kind}, not a segmenter" if kind else "GET /v1/models lists them") in error["message"]


def test_too_many_boxes_are_refused_before_an_encode(client: TestClient) -> None:
    data = encode_image(synthetic_scene(70, 50, seed=99))  # never embedded by any other test
    payload = {"image": {"base64": base64.b64encode(data).decode()}, "boxes": [[1, 1, 5, 5]] * 65}
    before = client.get("/v1/cache/stats").json()["embeddings"]["entries"]
    assert_error(segment(client, payload), 422, "too_many_boxes")
    assert client.get("/v1/cache/stats").json()["embeddings"]["entries"] == before


def test_unknown_image_id_says_to_send_the_image(client: TestClient) -> None:
    error = assert_error(segment(client, {"image_id": "0" * 64, "points": [[1, 1]]}), 404, "image_not_cached")
    assert "send the image" in error["message"]


def test_oversized_body_is_refused(tmp_path) -> None:
    app = create_app(make_settings(tmp_path, max_request_bytes=1000), load_models_in_background=False)
    with TestClient(app) as small:
        response = small.post(
            "/v1/sam/mobile_sam/embed", content=b"x" * 5000, headers={"content-type": "image/png"}
        )
        assert_error(response, 413, "request_too_large")
        payload = {"image": {"base64": base64.b64encode(b"y" * 4000).decode()}, "points": [[1, 1]]}
        assert_error(small.post("/v1/sam/mobile_sam/segment", json=payload), 413, "request_too_large")


# ---- prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"points": [[65, 10]]}, 422, "prompt_outside_image"),
        ({"points": [[-1, 10]]}, 422, "prompt_outside_image"),
        ({"box": [100, 100, 200, 200]}, 422, "prompt_outside_image"),
        ({"box": [30, 30, 10, 10]}, 422, "bad_prompt"),
        ({"box": [10, 10, 10, 20]}, 422, "bad_prompt"),
        ({"box": [0, 0, 10, 1e-50]}, 422, "bad_prompt"),  # empty once in float32 (found by fuzzing)
        ({"points": [[1e308, 1]]}, 422, "prompt_outside_image"),
        ({}, 422, "no_prompt"),
        ({"points": [[1, 1]], "labels": [1, 0]}, 422, "bad_prompt"),
        ({"points": [[1, 1]], "labels": [2]}, 422, "bad_prompt"),
        ({"points": [[1, 1]], "formats": ["png"]}, 422, "invalid_request"),
        ({"points": [[1, 1]], "max_masks": 9}, 422, "invalid_request"),
        ({"points": [[1, 1]], "mask_input": {"cvat": [5, 0, 0, 0, 0]}}, 422, "bad_mask_input"),
        ({"points": [[1, 1]], "mask_input": {"cvat": [1, 2, 3]}}, 422, "bad_mask_input"),
        # int64 run sums that wrap around to the box area: this request used to segfault the server.
        (
            {"points": [[1, 1]], "mask_input": {"cvat": [2.0**62] * 4 + [1, 0, 0, 0, 0]}},
            422,
            "bad_mask_input",
        ),
        (
            {
                "points": [[1, 1]],
                "mask_input": {"coco_rle": {"size": [48, 64], "counts": [2**62] * 4 + [3072]}},
            },
            422,
            "bad_mask_input",
        ),
        ({"points": [[1]]}, 422, "invalid_request"),
        ({"points": [[1, 1]], "unexpected": True}, 422, "invalid_request"),
        # several boxes in one call: each checked as `box` is, capped, and alone
        ({"boxes": []}, 422, "no_prompt"),
        ({"boxes": [[1, 1, 5, 5], [30, 30, 10, 10]]}, 422, "bad_prompt"),
        ({"boxes": [[10, 10, 10, 20]]}, 422, "bad_prompt"),
        ({"boxes": [[1, 1, 5, 5], [100, 100, 200, 200]]}, 422, "prompt_outside_image"),
        ({"boxes": [[1, 1, 5, 5]] * 65}, 422, "too_many_boxes"),
        ({"boxes": [[1, 1, 5, 5]], "points": [[1, 1]]}, 422, "bad_prompt"),
        ({"boxes": [[1, 1, 5, 5]], "box": [1, 1, 5, 5]}, 422, "bad_prompt"),
        ({"boxes": [[1, 1, 5, 5]], "max_masks": 2}, 422, "bad_prompt"),
        ({"boxes": [[1, 1, 5]]}, 422, "invalid_request"),
        ({"boxes": [1, 1, 5, 5]}, 422, "invalid_request"),
    ],
)
def test_bad_prompts(client: TestClient, image_id: str, payload: dict, status: int, code: str) -> None:
    assert_error(segment(client, {"image_id": image_id, **payload}), status, code)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_coordinates(client: TestClient, image_id: str, literal: str) -> None:
    body = f'{{"image_id": "{image_id}", "points": [[{literal}, 3]]}}'
    response = client.post(
        "/v1/sam/mobile_sam/segment", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "error" in response.json()


def test_image_and_image_id_together(client: TestClient, image_id: str) -> None:
    payload = {"image_id": image_id, "image": {"base64": "AAAA"}, "points": [[1, 1]]}
    assert_error(segment(client, payload), 422, "invalid_request")


def test_server_keeps_serving_after_bad_input(client: TestClient, image_id: str) -> None:
    for _ in range(3):
        client.post("/v1/sam/mobile_sam/embed", content=b"garbage", headers={"content-type": "image/png"})
    response = segment(client, {"image_id": image_id, "points": [[10, 10]]})
    assert response.status_code == 200
    assert json.loads(response.text)["masks"]
