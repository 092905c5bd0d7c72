"""The HTTP API: embed once, click many times; models, cache and health endpoints."""

from __future__ import annotations

import base64
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient
from pycocotools import mask as coco_mask

from server.app import create_app
from server.formats.rle import cvat_rle_decode

from .conftest import encode_image, make_settings, synthetic_scene

SCENE = encode_image(synthetic_scene(320, 240, seed=3))


def embed(client: TestClient, data: bytes = SCENE, model: str = "mobile_sam"):
    return client.post(f"/v1/sam/{model}/embed", content=data, headers={"content-type": "image/png"})


def test_embed_returns_content_hash_and_caches(client: TestClient) -> None:
    first = embed(client)
    assert first.status_code == 200
    body = first.json()
    assert body["image_id"] == hashlib.sha256(SCENE).hexdigest()
    assert (body["width"], body["height"]) == (320, 240)
    second = embed(client)
    assert second.json()["cached"] is True and second.headers["x-labelserve-cache"] == "hit"
    assert "encode" not in second.json()["timings_ms"] and "decode_image" not in second.json()["timings_ms"]
    assert first.headers["x-labelserve-weights"] == "random-init"
    assert "encode;dur=" in first.headers["server-timing"]


def test_three_ways_to_send_an_image_give_one_id(client: TestClient) -> None:
    expected = hashlib.sha256(SCENE).hexdigest()
    multipart = client.post("/v1/sam/mobile_sam/embed", files={"file": ("a.png", SCENE, "image/png")})
    as_json = client.post(
        "/v1/sam/mobile_sam/embed", json={"image": {"base64": base64.b64encode(SCENE).decode()}}
    )
    data_uri = "data:image/png;base64," + base64.b64encode(SCENE).decode()
    as_uri = client.post("/v1/sam/mobile_sam/embed", json={"image": {"base64": data_uri}})
    assert {r.json()["image_id"] for r in (multipart, as_json, as_uri)} == {expected}


def test_segment_all_formats_agree(client: TestClient) -> None:
    image_id = embed(client).json()["image_id"]
    response = client.post(
        "/v1/sam/mobile_sam/segment",
        json={
            "image_id": image_id,
            "points": [[90, 120]],
            "formats": ["cvat", "coco_rle", "polygons"],
            "polygon_tolerance": 0.0,
        },
    )
    assert response.status_code == 200
    mask = response.json()["masks"][0]
    from_cvat = cvat_rle_decode(mask["cvat"], 320, 240).to_full()
    rle = dict(mask["coco_rle"])
    rle["counts"] = rle["counts"].encode()
    from_coco = coco_mask.decode(rle).astype(bool)
    assert np.array_equal(from_cvat, from_coco)
    assert mask["area"] == int(from_cvat.sum())
    x, y, w, h = mask["bbox"]
    ys, xs = np.nonzero(from_cvat)
    assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    assert all(len(p) >= 6 for p in mask["polygons"])


def test_multipart_segment_with_prompts(client: TestClient) -> None:
    response = client.post(
        "/v1/sam/mobile_sam/segment",
        files={"file": ("scene.png", SCENE, "image/png")},
        data={"prompts": json.dumps({"points": [[100, 100]], "max_masks": 3, "multimask_output": True})},
    )
    assert response.status_code == 200, response.text
    scores = [m["score"] for m in response.json()["masks"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_refinement_is_automatic_and_reported(client: TestClient) -> None:
    image_id = embed(client).json()["image_id"]
    url = "/v1/sam/mobile_sam/segment"
    assert (
        client.post(url, json={"image_id": image_id, "points": [[50, 60]]}).json()["refined_from_points"]
        is None
    )
    second = client.post(url, json={"image_id": image_id, "points": [[50, 60], [200, 100]], "labels": [1, 0]})
    assert second.json()["refined_from_points"] == 1
    third = client.post(
        url, json={"image_id": image_id, "points": [[50, 60], [200, 100], [70, 80]], "labels": [1, 0, 1]}
    )
    assert third.json()["refined_from_points"] == 2
    unrelated = client.post(url, json={"image_id": image_id, "points": [[10, 10], [20, 20]]})
    assert unrelated.json()["refined_from_points"] is None


def test_mask_prompt_round_trip(client: TestClient) -> None:
    image_id = embed(client).json()["image_id"]
    first = client.post(
        "/v1/sam/mobile_sam/segment", json={"image_id": image_id, "points": [[90, 120]]}
    ).json()
    again = client.post(
        "/v1/sam/mobile_sam/segment",
        json={
            "image_id": image_id,
            "points": [[90, 120]],
            "mask_input": {"cvat": first["masks"][0]["cvat"]},
        },
    )
    assert again.status_code == 200 and again.json()["masks"]


def test_concurrent_first_clicks_encode_once(tmp_path) -> None:
    app = create_app(make_settings(tmp_path), load_models_in_background=False)
    image = encode_image(synthetic_scene(200, 150, seed=11))
    with TestClient(app) as fresh, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: embed(fresh, image).json(), range(4)))
        stats = fresh.get("/v1/cache/stats").json()["embeddings"]
    assert [r["cached"] for r in results].count(False) == 1
    assert stats["entries"] == 1 and stats["misses"] >= 1 and stats["inflight_waits"] + stats["hits"] >= 3


def test_byte_cap_evicts_and_evicted_id_gets_404(tmp_path) -> None:
    one_embedding = 256 * 64 * 64 * 2  # fp16
    app = create_app(make_settings(tmp_path, cache_bytes=one_embedding), load_models_in_background=False)
    first, second = (encode_image(synthetic_scene(100, 80, seed=s)) for s in (21, 22))
    with TestClient(app) as small:
        first_id = embed(small, first).json()["image_id"]
        embed(small, second)
        stats = small.get("/v1/cache/stats").json()["embeddings"]
        assert stats["entries"] == 1 and stats["bytes"] <= one_embedding and stats["evictions"] == 1
        response = small.post("/v1/sam/mobile_sam/segment", json={"image_id": first_id, "points": [[5, 5]]})
        assert response.status_code == 404 and response.json()["error"]["code"] == "image_not_cached"


def test_models_health_and_cache_endpoints(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    segmenters = {n: m["kinds"] for n, m in models.items() if m["kind"] == "segmenter"}
    sam2 = {n for n in segmenters if n.startswith("sam2")}
    assert set(segmenters) - sam2 == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam"}
    assert {"sam2.1_hiera_tiny", "sam2.1_hiera_large", "sam2_hiera_tiny"} <= sam2  # clicks, and tracking:
    assert all(segmenters[n] == ["segmenter", "tracker"] for n in sam2)
    assert models["yolo11n"]["kind"] == "detector" and models["yolo11n"]["state"] == "disabled"
    assert models["mobile_sam"]["state"] == "loaded" and models["mobile_sam"]["weights"] == "random-init"
    assert "RANDOM" in models["mobile_sam"]["message"]
    assert models["sam_vit_h"]["state"] == "disabled" and "LABELSERVE_MODELS" in models["sam_vit_h"]["fix"]
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200
    embed(client)
    assert client.get("/v1/cache/stats").json()["embeddings"]["entries"] >= 1
    assert client.delete("/v1/cache").status_code == 200
    assert client.get("/v1/cache/stats").json()["embeddings"]["entries"] == 0
    assert "/v1/sam/{model}/segment" in client.get("/openapi.json").json()["paths"]


def test_missing_weights_are_listed_with_the_fix_and_refused_with_503(tmp_path) -> None:
    app = create_app(make_settings(tmp_path, random_init=False), load_models_in_background=False)
    with TestClient(app) as offline:
        model = {m["name"]: m for m in offline.get("/v1/models").json()["models"]}["mobile_sam"]
        assert model["state"] == "unavailable" and not model["available"]
        assert model["fix"].startswith("labelserve weights fetch mobile_sam")
        assert offline.get("/readyz").status_code == 200  # loading is over; the model is just unavailable
        response = embed(offline)
        assert response.status_code == 503
        assert "labelserve weights fetch mobile_sam" in response.json()["error"]["message"]
