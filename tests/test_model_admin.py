"""Loading and unloading models at run time (`POST /v1/models/{model}/load|unload`, admin scope): what
unloading frees (checked by weak references: no service keeps the model alive), what requests for an unloaded
model are told, that work already queued still runs, and that a reload gives the same model back."""

from __future__ import annotations

import base64
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.base import ModelUnavailable, unloaded
from models.registry import ModelRegistry
from server.app import create_app
from server.services.batching import MicroBatcher
from server.services.embeddings.scheduler import EncodeScheduler, Priority

from .conftest import encode_image, make_settings, synthetic_scene

PNG = base64.b64encode(encode_image(synthetic_scene(320, 240))).decode()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, data_dir=tmp_path / "data", detector_paths={"det": "yolo11n.yaml"})
    with TestClient(create_app(settings, load_models_in_background=False)) as test_client:
        yield test_client


def state_of(client: TestClient, model: str) -> dict:
    return next(m for m in client.get("/v1/models").json()["models"] if m["name"] == model)


def wait_for_state(client: TestClient, model: str, *, not_: str = "loading", timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (record := state_of(client, model))["state"] == not_ and time.monotonic() < deadline:
        time.sleep(0.1)
    return record


def wait_until_dead(ref: weakref.ref, timeout: float = 10) -> bool:
    """Worker threads let go of their model when their queue is empty, a moment after the unload answers."""
    deadline = time.monotonic() + timeout
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return ref() is None


def click(client: TestClient, image_id: str) -> dict:
    response = client.post("/v1/sam/mobile_sam/segment", json={"image_id": image_id, "points": [[160, 120]]})
    assert response.status_code == 200, response.text
    return response.json()


def test_unload_frees_the_segmenter_and_a_reload_gives_the_same_masks(client: TestClient) -> None:
    image_id = client.post("/v1/sam/mobile_sam/embed", json={"image": {"base64": PNG}}).json()["image_id"]
    before = click(client, image_id)
    tracked = client.post(
        "/v1/track/mobile_sam-propagate",
        json={"image": {"base64": PNG}, "shapes": [{"type": "rectangle", "points": [100, 80, 220, 160]}]},
    )
    assert tracked.status_code == 200, tracked.text
    state_id = tracked.json()["states"][0]
    ref = weakref.ref(client.app.state.services.registry.record("mobile_sam").model)

    unloaded_answer = client.post("/v1/models/mobile_sam/unload")
    assert unloaded_answer.status_code == 200, unloaded_answer.text
    body = unloaded_answer.json()
    assert body["was"] == "loaded" and body["state"] == "disabled"
    assert body["dropped"]["embeddings"] == 1 and body["dropped"]["refinement"] == 1  # clicked and tracked
    assert body["dropped"]["track_states"] == 1
    assert wait_until_dead(ref), "something still holds the unloaded model"
    assert client.get("/v1/cache/stats").json()["embeddings"]["entries"] == 0

    refused = client.post("/v1/sam/mobile_sam/segment", json={"image_id": image_id, "points": [[1, 1]]})
    assert refused.status_code == 503
    assert "POST /v1/models/mobile_sam/load" in refused.json()["error"]["message"]
    step = client.post(
        "/v1/track/mobile_sam-propagate/step", json={"image": {"base64": PNG}, "states": [state_id]}
    )
    assert step.status_code in (404, 503)  # its state is gone, and so is its model
    assert "mobile_sam-propagate" not in [t["name"] for t in client.get("/v1/trackers").json()["trackers"]]

    assert client.post("/v1/models/mobile_sam/load").status_code in (200, 202)
    assert wait_for_state(client, "mobile_sam")["state"] == "loaded"
    again = client.post("/v1/sam/mobile_sam/embed", json={"image": {"base64": PNG}}).json()
    assert again["image_id"] == image_id and again["cached"] is False  # encoded anew
    assert click(client, image_id)["masks"] == before["masks"]  # same seeded weights, same mask


def test_unload_frees_a_detector_and_its_batcher(client: TestClient) -> None:
    detect = {"image": {"base64": PNG}}
    assert client.post("/v1/detect/det", json=detect).status_code == 200
    ref = weakref.ref(client.app.state.services.registry.record("det").model)
    assert client.post("/v1/models/det/unload").json()["was"] == "loaded"
    assert wait_until_dead(ref)
    assert client.post("/v1/detect/det", json=detect).status_code == 503
    assert "det" not in client.app.state.services.detect.batchers()
    assert client.post("/v1/models/det/load").status_code in (200, 202)
    assert wait_for_state(client, "det")["state"] == "loaded"
    assert client.post("/v1/detect/det", json=detect).status_code == 200


def test_a_model_not_enabled_at_start_can_be_loaded(client: TestClient) -> None:
    assert state_of(client, "yolo11n")["state"] == "disabled"
    assert "POST /v1/models/yolo11n/load" in state_of(client, "yolo11n")["message"]
    answer = client.post("/v1/models/yolo11n/load")
    assert answer.status_code == 202 and answer.json()["state"] == "loading"
    assert wait_for_state(client, "yolo11n")["state"] == "loaded"
    assert client.post("/v1/models/yolo11n/load").status_code == 200  # loaded already: nothing to do
    assert client.post("/v1/detect/yolo11n", json={"image": {"base64": PNG}}).status_code == 200


def test_unloading_what_is_not_loaded_changes_nothing_and_unknown_names_are_404(client: TestClient) -> None:
    answer = client.post("/v1/models/yolo11n/unload")
    assert answer.status_code == 200
    assert answer.json()["was"] == "disabled" and answer.json()["dropped"] is None
    for verb in ("load", "unload"):
        missing = client.post(f"/v1/models/no_such_model/{verb}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"


def test_load_checks_weights_like_the_start_does(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, models=[], random_init=False, data_dir=tmp_path / "data")
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        assert client.post("/v1/models/yolo11n/load").status_code == 202
        record = wait_for_state(client, "yolo11n")
        assert record["state"] == "unavailable" and "labelserve weights fetch yolo11n" in record["fix"]


def test_unload_while_loading_is_a_409(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    build = ModelRegistry._build

    def slow_build(self: ModelRegistry, record, source):  # noqa: ANN001, ANN202
        release.wait(60)
        return build(self, record, source)

    settings = make_settings(tmp_path, models=[], data_dir=tmp_path / "data")
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        monkeypatch.setattr(ModelRegistry, "_build", slow_build)
        assert client.post("/v1/models/yolo11n/load").status_code == 202
        conflict = client.post("/v1/models/yolo11n/unload")
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "model_loading"
        release.set()
        assert wait_for_state(client, "yolo11n")["state"] == "loaded"


# ---- queued work survives an unload; new work is refused ----------------------------------------------
def test_a_retired_batcher_runs_what_it_holds_then_refuses() -> None:
    started, release = threading.Event(), threading.Event()

    def run(_key: object, items: list[int]) -> list[int]:
        started.set()
        release.wait(10)
        return [item * 2 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch=1, max_wait_ms=0, name="t")
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(batcher.submit("k", i))) for i in range(3)]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    time.sleep(0.1)  # the other two are queued now
    batcher.retire(unloaded("m"))
    with pytest.raises(ModelUnavailable, match="unloaded"):
        batcher.submit("k", 9)
    release.set()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [0, 2, 4]
    batcher._worker.join(10)
    assert not batcher._worker.is_alive()


def test_a_retired_encoder_runs_what_is_queued_then_refuses() -> None:
    release = threading.Event()

    def encode(image: np.ndarray) -> object:
        release.wait(10)
        return image.sum()

    scheduler = EncodeScheduler(encode, "m")  # type: ignore[arg-type]
    tickets = [scheduler.submit(np.full((2, 2), i), Priority.BACKGROUND) for i in range(3)]
    scheduler.retire(unloaded("m"))
    with pytest.raises(ModelUnavailable):
        scheduler.submit(np.zeros((2, 2)), Priority.INTERACTIVE)
    release.set()
    assert [ticket.result() for ticket in tickets] == [0, 4, 8]
    scheduler._worker.join(10)
    assert not scheduler._worker.is_alive()
