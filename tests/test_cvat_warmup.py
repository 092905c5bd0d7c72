"""Warm before the annotator arrives: CVAT webhooks and look-ahead from AI-agent clicks, end to end.

A `labelserve serve` process (MobileSAM, random weights) reads frames from moto's S3 over loopback; the CVAT
emulator holds a project whose task lives in that bucket (a cloud storage with a manifest), registers a
webhook with `labelserve cvat webhook register`, and delivers signed `update:job` events to the server as
CVAT does. Ground truth is by construction: which frames a job has, and their bytes.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import PIL.Image
import pytest
from cvat_cli._internal import agent_driver, agent_driver_interaction
from cvat_cli._internal.common import FunctionLoader

from server.services.warmup import decide, signature_of

from .conftest import encode_image, synthetic_scene
from .cvat_bucket import SECRET, CvatBucket, cvat_bucket

MODEL = "mobile_sam"
AGENT = Path(__file__).parents[1] / "server" / "cvat" / "agent_functions.py"


def frame_bytes(index: int) -> bytes:
    return encode_image(synthetic_scene(96, 72, seed=5000 + index), "JPEG", quality=90)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CvatBucket]:
    """24 frames in 3 jobs of 8; a second profile without a webhook secret."""
    frames = [frame_bytes(i) for i in range(24)]
    nosecret = {"nosecret": {"url": "http://127.0.0.1:9", "token": "t"}}
    with cvat_bucket(frames, 8, extra_profiles=nosecret, tmp=tmp_path_factory.mktemp("warmup")) as found:
        yield found


def runs(world: CvatBucket) -> list[dict]:
    return world.http.get("/v1/prefetch").json()


def wait_until(check: Callable[[], object], timeout: float = 240) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise TimeoutError


def finished(world: CvatBucket, run_id: str) -> dict:
    return wait_until(
        lambda: (
            (s := world.http.get(f"/v1/prefetch/{run_id}").json())["state"] not in ("queued", "running") and s
        )
    )


def frame_downloads(world: CvatBucket) -> int:
    return len([r for r in world.cvat.calls("GET", "/data/") if r.query.get("type") == ["frame"]])


# -- the decision, by construction ------------------------------------------------------------------------


def job(**fields: object) -> dict:
    return {"id": 9, "task_id": 3, "start_frame": 10, "stop_frame": 19, "type": "annotation", "state": "new",
            "assignee": None, **fields}  # fmt: skip


ALICE, BOB = {"username": "alice"}, {"username": "bob"}


@pytest.mark.parametrize(
    ("payload", "action", "key"),
    [
        ({"event": "update:job", "job": job(assignee=ALICE), "before_update": {"assignee": None}}, "restart",
         "job:9:alice"),
        ({"event": "update:job", "job": job(assignee=BOB), "before_update": {"assignee": ALICE}}, "restart",
         "job:9:bob"),
        ({"event": "update:job", "job": job(state="in progress", assignee=ALICE),
          "before_update": {"state": "new"}}, "start", "job:9:alice"),
        ({"event": "update:job", "job": job(), "before_update": {"assignee": ALICE}}, "cancel", "job:9:"),
        ({"event": "update:job", "job": job(state="completed", assignee=ALICE),
          "before_update": {"state": "in progress"}}, "cancel", "job:9:"),
        ({"event": "update:job", "job": job(stage="validation"), "before_update": {"stage": "annotation"}},
         "ignore", None),
        ({"event": "update:job", "job": job(type="ground_truth", assignee=ALICE),
          "before_update": {"assignee": None}}, "ignore", None),
        ({"event": "update:job", "job": {"id": 9}, "before_update": {}}, "ignore", None),
        ({"event": "ping"}, "ignore", None),
        ({"event": "create:task", "task": {"id": 4, "size": 10}}, "ignore", None),  # not asked for
        ({"event": "update:issue"}, "ignore", None),
    ],
)  # fmt: skip
def test_what_each_delivery_asks_for(payload: dict, action: str, key: str | None) -> None:
    decision = decide(payload, budget=100, new_tasks=False)
    assert (decision.action, decision.key) == (action, key), decision.reason
    if action in ("start", "restart"):
        assert decision.frames is not None and (decision.frames.first, decision.frames.last) == (10, 19)


def test_new_tasks_when_asked() -> None:
    ready = decide({"event": "create:task", "task": {"id": 4, "size": 10}}, budget=100, new_tasks=True)
    assert (ready.action, ready.key) == ("start", "task:4")
    empty = decide({"event": "create:task", "task": {"id": 4, "size": 0}}, budget=100, new_tasks=True)
    assert empty.action == "ignore"
    done = {"event": "completed:request[create:task]",
            "request": {"status": "finished", "operation": {"task_id": 5}}}  # fmt: skip
    assert decide(done, budget=100, new_tasks=True).key == "task:5"


# -- signatures ---------------------------------------------------------------------------------------------


def test_unsigned_or_badly_signed_deliveries_are_refused_and_run_nothing(world: CvatBucket) -> None:
    before = len(runs(world))
    payload = {"event": "update:job", "job": {**job(assignee=ALICE), "task_id": world.task.id},
               "before_update": {"assignee": None}}  # fmt: skip
    body = json.dumps(payload).encode()
    for signature, code in [(None, "missing_signature"), ("sha256=" + "0" * 64, "bad_signature"),
                            (signature_of("another secret", body), "bad_signature")]:  # fmt: skip
        delivery = world.cvat.deliver(world.webhook_id, body, signature=signature)
        assert delivery.status_code == 401 and json.loads(delivery.response)["error"]["code"] == code
    changed = world.http.post("/v1/cvat/webhooks/cvat", content=body.replace(b"alice", b"mallory"),
                              headers={"X-Signature-256": signature_of(SECRET, body)})  # fmt: skip
    assert changed.status_code == 401
    assert len(runs(world)) == before
    ping = world.http.post(f"{world.cvat.url}/api/webhooks/{world.webhook_id}/ping",
                           headers={"Authorization": f"Bearer {world.cvat.token}"})  # fmt: skip
    assert ping.status_code in (200, 201) and world.cvat.deliveries[-1].status_code == 200


def test_profiles_without_secret_or_unknown_are_refused(world: CvatBucket) -> None:
    body = b'{"event": "ping"}'
    headers = {"X-Signature-256": signature_of(SECRET, body)}
    no_secret = world.http.post("/v1/cvat/webhooks/nosecret", content=body, headers=headers)
    assert no_secret.status_code == 403 and no_secret.json()["error"]["code"] == "webhooks_not_configured"
    unknown = world.http.post("/v1/cvat/webhooks/nope", content=body, headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_cvat_profile"


# -- a job that starts, end to end ---------------------------------------------------------------------------


def test_assigned_job_is_prefetched_from_the_bucket_in_frame_order(world: CvatBucket) -> None:
    first_job = world.task.jobs[0]
    downloads = frame_downloads(world)
    (delivery,) = world.cvat.update_job(first_job.id, assignee="alice")
    reply = json.loads(delivery.response)
    assert delivery.status_code == 200 and reply["action"] == "restart", reply
    (run,) = reply["runs"]
    again = world.cvat.deliver(world.webhook_id, delivery.payload)  # CVAT redelivers: joins the run
    assert json.loads(again.response)["runs"][0]["id"] == run["id"]
    done = finished(world, run["id"])
    assert (done["state"], done["total"], done["done"]) == ("completed", 8, 8), done
    assert done["origin"] == f"cvat cvat: job {first_job.id}"
    assert frame_downloads(world) == downloads  # read from S3, not through CVAT
    # CVAT's first click on each of the job's frames: its original bytes hit the prefetched embedding.
    for index in range(first_job.start_frame, first_job.stop_frame + 1):
        click = world.nuclio_click(index, [[40, 30]])
        assert click.status_code == 200 and "encode" not in click.headers["server-timing"], index
    # A frame of another job was not prefetched.
    assert "encode" in world.nuclio_click(first_job.stop_frame + 1, [[40, 30]]).headers["server-timing"]


def test_reassigned_mid_prefetch_restarts_without_reading_again_and_clicks_go_first(
    world: CvatBucket,
) -> None:
    second = world.task.jobs[1]
    (delivery,) = world.cvat.update_job(second.id, assignee="alice", state="in progress")
    (run,) = json.loads(delivery.response)["runs"]
    wait_until(lambda: world.http.get(f"/v1/prefetch/{run['id']}").json()["done"] >= 1)
    # A click on a new image while the webhook's run encodes: served after at most the encode running.
    fresh = encode_image(synthetic_scene(96, 72, seed=4999), "PNG")
    clicked = world.http.post(f"/v1/sam/{MODEL}/embed", content=fresh, headers={"content-type": "image/png"})
    assert clicked.status_code == 200 and clicked.json()["cache_tier"] == "encode"
    assert world.http.get("/v1/cache/stats").json()["encoders"][MODEL]["interactive_waited_encodes_max"] <= 1

    (moved,) = world.cvat.update_job(second.id, assignee="bob")
    reply = json.loads(moved.response)
    cancelled, restarted = reply["runs"]
    assert cancelled["id"] == run["id"], reply  # it ends once the frame it is encoding is done
    old = finished(world, run["id"])
    assert old["state"] == "cancelled" and old["done"] < 8
    new = finished(world, restarted["id"])
    assert new["state"] == "completed" and new["total"] == 8
    assert new["cached"] >= old["done"] and new["cached"] + new["encoded"] == 8
    (done,) = world.cvat.update_job(second.id, state="completed")
    assert json.loads(done.response)["action"] == "cancel"


def test_completed_job_cancels_its_run(world: CvatBucket) -> None:
    third = world.task.jobs[2]
    (started,) = world.cvat.update_job(third.id, assignee="carol")
    (run,) = json.loads(started.response)["runs"]
    (completed,) = world.cvat.update_job(third.id, state="completed")
    reply = json.loads(completed.response)
    assert reply["action"] == "cancel"
    assert finished(world, run["id"])["state"] in ("cancelled", "completed")  # it may have finished first
    assert all(r["state"] != "running" for r in runs(world) if r["id"] == run["id"])


# -- look-ahead from the AI agent ---------------------------------------------------------------------------


def test_agent_click_on_frame_n_warms_the_next_frames(world: CvatBucket) -> None:
    loaded = FunctionLoader(
        function_module=None,
        function_file=AGENT,
        function_parameters={"url": world.server.url, "model": MODEL, "lookahead": 2, "cvat_profile": "cvat"},
    ).load()
    agent_driver.set_worker_current_function(loaded)
    agent_driver_interaction.AgentInteractionFunctionDriver.init_worker(None)
    last = world.task.jobs[2]
    n = last.start_frame
    prompts = agent_driver_interaction._InteractionPromptsImpl(
        pos_points=((40.0, 30.0),), neg_points=(), bounding_box=None
    )

    def agent_click(frame: int) -> None:
        image = PIL.Image.open(io.BytesIO(world.frames[frame]))
        agent_driver_interaction._worker_job_interact((world.task.id, frame, ()), image, prompts)

    agent_click(n)
    run = wait_until(lambda: next((r for r in runs(world) if "look-ahead from frame" in r["origin"]), None))
    assert run["origin"] == f"cvat cvat: look-ahead from frame {n}"
    done = finished(world, run["id"])
    assert (done["state"], done["total"]) == ("completed", 2), done

    # The agent sends frame n+1 as PNG: its pixels find the embedding prefetched from the JPEG.
    def encodes() -> int:  # the clicks' own; the look-ahead encodes in the background meanwhile
        return world.http.get("/v1/cache/stats").json()["encoders"][MODEL]["done"].get("interactive", 0)

    before = encodes()
    agent_click(n + 1)
    assert encodes() == before
    # ...and that click asked for n+2, n+3 (only n+3 is new), replacing nothing still running.
    newer = wait_until(
        lambda: next((r for r in runs(world) if r["origin"].endswith(f"from frame {n + 1}")), None)
    )
    assert finished(world, newer["id"])["total"] == 2


def test_lookahead_requests_are_checked(world: CvatBucket) -> None:
    base = {"profile": "cvat", "task_id": world.task.id, "frame": 0}
    too_many = world.http.post("/v1/cvat/lookahead", json={**base, "count": 1000})
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "too_many_frames"
    unknown = world.http.post("/v1/cvat/lookahead", json={**base, "profile": "nope"})
    assert unknown.status_code == 404
    bad = world.http.post("/v1/cvat/lookahead", json={**base, "frame": -1})
    assert bad.status_code == 422
