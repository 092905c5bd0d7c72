"""POST /v1/prefetch with MobileSAM: progress, cache hits afterwards, interactive priority over a running
prefetch, the bounded run queue, cancellation and bad requests."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import encode_image, make_settings, synthetic_scene

MODEL = "mobile_sam"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(tmp_path_factory.mktemp("prefetch"), prefetch_max_runs=2, prefetch_max_images=5)
    with TestClient(create_app(settings, load_models_in_background=False)) as test_client:
        yield test_client


def frame(seed: int) -> bytes:
    return encode_image(synthetic_scene(64, 48, seed=seed))


def inline(*images: bytes) -> list[dict]:
    return [{"base64": base64.b64encode(image).decode()} for image in images]


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def wait_for(client: TestClient, path: str, until: Callable[[dict], bool], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if until(body):
            return body
        time.sleep(0.05)
    raise TimeoutError(body)


def test_prefetch_of_a_directory_range_then_the_first_click_is_a_cache_hit(client: TestClient, tmp_path):
    frames = {name: frame(seed) for name, seed in (("f0", 40), ("f1", 41), ("f4", 42))}
    for name, data in frames.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    (tmp_path / "f2.png").write_bytes(b"not a png")
    (tmp_path / "f3.png").write_bytes(frames["f1"])  # the same frame twice: encoded once
    body = {"model": MODEL, "source": {"directory": str(tmp_path)}, "range": {"start": 1, "stop": 4}}
    lookups = client.get("/v1/cache/stats").json()["embeddings"]
    submitted = client.post("/v1/prefetch", json=body)
    assert submitted.status_code == 202 and submitted.json()["total"] == 3
    run_id = submitted.json()["id"]

    status = wait_for(client, f"/v1/prefetch/{run_id}", lambda s: s["state"] not in ("queued", "running"))
    assert status["state"] == "completed"
    counts = {key: status[key] for key in ("done", "encoded", "cached", "failed", "pending")}
    assert counts == {"done": 2, "encoded": 1, "cached": 1, "failed": 1, "pending": 0}
    assert status["failures"][0]["image"] == "f2.png" and "not an image" in status["failures"][0]["error"]
    assert status["images_per_second"] > 0 and at(status["finished_at"]) >= at(status["started_at"])

    first_click = client.post(
        f"/v1/sam/{MODEL}/embed", content=frames["f1"], headers={"content-type": "image/png"}
    )
    assert first_click.json()["cache_tier"] == "l1" and "encode" not in first_click.json()["timings_ms"]
    # The hit rate is the requests': the prefetch's own lookups (misses by design) are not counted.
    after = client.get("/v1/cache/stats").json()["embeddings"]
    assert (after["hits"], after["misses"]) == (lookups["hits"] + 1, lookups["misses"])
    outside = {"image_id": hashlib.sha256(frames["f0"]).hexdigest(), "points": [[1, 1]]}
    assert client.post(f"/v1/sam/{MODEL}/segment", json=outside).status_code == 404  # not in the range
    finished = client.delete(f"/v1/prefetch/{run_id}")
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "prefetch_finished"


def test_interactive_embed_overtakes_a_running_prefetch_and_the_run_queue_is_bounded(client: TestClient):
    body = {"model": MODEL, "images": inline(*map(frame, (50, 51, 52)))}
    run_id = client.post("/v1/prefetch", json=body).json()["id"]
    # Wait until one prefetch encode is running and the next one is queued behind it.
    wait_for(
        client,
        "/v1/cache/stats",
        lambda s: (
            (enc := s["encoders"].get(MODEL)) is not None
            and enc["running"] == "background"
            and enc["queued"]["background"] >= 1
        ),
    )

    # Two runs at most (LABELSERVE_PREFETCH_MAX_RUNS=2): a second one queues, a third is refused.
    queued = client.post("/v1/prefetch", json={"model": MODEL, "images": inline(frame(53))})
    assert queued.status_code == 202 and queued.json()["state"] == "queued"
    refused = client.post("/v1/prefetch", json={"model": MODEL, "images": inline(frame(54))})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "prefetch_busy"
    assert int(refused.headers["retry-after"]) >= 1
    cancelled = client.delete(f"/v1/prefetch/{queued.json()['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

    clicked = client.post(f"/v1/sam/{MODEL}/embed", content=frame(55), headers={"content-type": "image/png"})
    clicked_at = time.time()
    during = client.get(f"/v1/prefetch/{run_id}").json()
    assert clicked.status_code == 200 and clicked.json()["cache_tier"] == "encode"
    # The click was served before the prefetch's remaining images...
    assert during["state"] == "running" and during["pending"] >= 1
    # ...after waiting for at most the one encode already running, not for the queued prefetch work.
    encoder = client.get("/v1/cache/stats").json()["encoders"][MODEL]
    assert encoder["interactive_waited_encodes_max"] <= 1

    final = wait_for(client, f"/v1/prefetch/{run_id}", lambda s: s["state"] != "running")
    assert final["state"] == "completed" and final["encoded"] == 3 and at(final["finished_at"]) > clicked_at
    assert client.get(f"/v1/prefetch/{queued.json()['id']}").json()["done"] == 0  # never ran


def test_cancelling_a_running_prefetch_stops_it(client: TestClient):
    body = {"model": MODEL, "images": inline(*map(frame, range(60, 65)))}
    run_id = client.post("/v1/prefetch", json=body).json()["id"]
    wait_for(client, f"/v1/prefetch/{run_id}", lambda s: s["state"] == "running")
    at_cancel = client.delete(f"/v1/prefetch/{run_id}").json()
    final = wait_for(client, f"/v1/prefetch/{run_id}", lambda s: s["state"] != "running")
    # The images already being read or encoded (two at most) finish; the others are skipped.
    assert final["state"] == "cancelled" and final["done"] <= at_cancel["done"] + 2 and final["pending"] >= 1


URL = [{"url": "http://x/a.jpg"}]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "no_such_model", "images": URL}, 404, "unknown_model"),
        ({"model": MODEL}, 422, "invalid_request"),
        ({"model": MODEL, "images": URL, "source": {"urls": ["http://x/a.jpg"]}}, 422, "invalid_request"),
        ({"model": MODEL, "images": [], "source": {"paths": ["/a.png"]}}, 422, "invalid_request"),
        ({"model": MODEL, "images": URL, "range": {"start": 1}}, 400, "range_empty"),
        ({"model": MODEL, "images": URL, "range": {"step": 0}}, 422, "invalid_request"),
        ({"model": MODEL, "source": {"directory": "/no/such/dir"}}, 400, "source_not_found"),
        ({"model": MODEL, "images": URL * 6}, 422, "too_many_images"),
    ],
)
def test_bad_prefetch_requests_get_clear_errors(client: TestClient, body: dict, status: int, code: str):
    response = client.post("/v1/prefetch", json=body)
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


def test_unknown_run_is_404_and_non_json_is_415(client: TestClient):
    for method in ("get", "delete"):
        response = getattr(client, method)("/v1/prefetch/nope")
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_prefetch"
    wrong = client.post("/v1/prefetch", content=b"model=mobile_sam", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415


def test_prefetch_is_in_the_openapi_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/prefetch" in schema["paths"] and "PrefetchRequest" in schema["components"]["schemas"]
