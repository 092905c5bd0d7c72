"""Backpressure: bounded in-flight work answered with 503 + Retry-After, bounded model queues, timeouts,
and "latest wins" for clicks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.api.backpressure import InflightLimiter, LatestWins
from server.app import create_app
from server.errors import ApiError
from server.services.batching import MicroBatcher

from .conftest import encode_image, make_settings, synthetic_scene


def test_inflight_limit_refuses_with_retry_after_and_recovers(tmp_path) -> None:  # noqa: ANN001
    app = create_app(make_settings(tmp_path, max_inflight_interactive=1, busy_retry_after_s=2),
                     load_models_in_background=False)  # fmt: skip
    limiter: InflightLimiter = app.state.inflight
    with TestClient(app) as client:
        image = encode_image(synthetic_scene(320, 240))
        assert limiter.admit("interactive")  # one interactive request is in progress
        full = client.post("/v1/sam/mobile_sam/embed", content=image, headers={"content-type": "image/png"})
        assert full.status_code == 503 and full.headers["retry-after"] == "2"
        assert full.json()["error"]["code"] == "server_busy"
        assert client.get("/healthz").status_code == 200  # never limited
        assert client.get("/v1/jobs").status_code == 200  # status reads are not interactive work
        limiter.release("interactive")
        again = client.post("/v1/sam/mobile_sam/embed", content=image, headers={"content-type": "image/png"})
        assert again.status_code == 200
        assert limiter.snapshot()["refused"]["interactive"] == 1
        assert limiter.snapshot()["inflight"]["interactive"] == 0


def test_micro_batcher_queue_is_bounded_and_times_out() -> None:
    release = threading.Event()

    def run(_key: object, items: list[int]) -> list[int]:
        release.wait(10)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run, 1, 0, "t", max_queue=2, timeout_s=0.3)
    outcomes: list[object] = []

    def submit(item: int) -> None:
        try:
            outcomes.append(batcher.submit("k", item))
        except ApiError as exc:
            outcomes.append(exc.status)

    workers = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for worker in workers:  # one runs (blocked), two wait in the queue
        worker.start()
        time.sleep(0.05)
    with pytest.raises(ApiError) as full:
        batcher.submit("k", 99)
    assert full.value.status == 503 and "Retry-After" in full.value.headers
    time.sleep(0.6)
    release.set()
    for worker in workers:
        worker.join(5)
    # The two queued ones timed out (504) and were dropped, never run; the running one finished.
    assert sorted(outcomes, key=str) == [0, 504, 504]
    assert batcher.refused == 1


def test_latest_wins_drops_the_older_click() -> None:
    latest = LatestWins()
    older = latest.ticket("tab-1", "mobile_sam", "img")
    newer = latest.ticket("tab-1", "mobile_sam", "img")
    other_image = latest.ticket("tab-1", "mobile_sam", "img2")
    other_client = latest.ticket("tab-2", "mobile_sam", "img")
    with pytest.raises(ApiError) as stale:
        latest.check(*older)
    assert stale.value.status == 409 and stale.value.code == "superseded"
    for ticket in (newer, other_image, other_client):
        latest.check(*ticket)


def test_latest_wins_over_http(client: TestClient) -> None:
    image = encode_image(synthetic_scene(320, 240, seed=5))
    image_id = client.post("/v1/sam/mobile_sam/embed", content=image,
                           headers={"content-type": "image/png"}).json()["image_id"]  # fmt: skip
    latest: LatestWins = client.app.state.latest_wins
    stale = latest.ticket("tab-9", "mobile_sam", image_id)
    body = {"image_id": image_id, "points": [[100, 100]]}
    answered = client.post("/v1/sam/mobile_sam/segment", json=body, headers={"X-Client-ID": "tab-9"})
    assert answered.status_code == 200
    with pytest.raises(ApiError):
        latest.check(*stale)  # the HTTP click superseded the older one
    assert np.isfinite(answered.json()["masks"][0]["score"])
