"""labelserve on Ray Serve (server/scale/): a real local Ray instance on loopback, two worker replicas, a real
redis-server as the shared L2, MobileSAM with seeded random weights. Clicks stick to the replica that embedded
their image (one encode per image), a full owner spills to its neighbour, which reads L2, a flood is refused
with 429 + Retry-After, and the masks equal the plain server's. Skipped without the `ray` extra."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pybase64
import pytest
from fastapi.testclient import TestClient

from server.api.auth import hash_key, new_key
from server.app import create_app
from server.scale.routing import JOBS_KEY, created_names, pinned_names, routing_key, tracking_states
from server.settings import Settings

from .conftest import encode_image, make_settings, synthetic_scene
from .redis_server import REDIS_SERVER, RedisServer
from .server_process import free_port
from .synthetic_video import SyntheticVideo, box_iou

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mobile_sam"
REPLICA = "x-labelserve-replica"
MAX_QUEUED = 4


def png(seed: int) -> bytes:
    return encode_image(synthetic_scene(320, 240, seed=seed))


# --- the routing key, without Ray ---


def test_routing_key_is_the_content_id_the_workers_use() -> None:
    from server.inputs.images import image_id

    data = png(0)
    content = image_id(data)
    b64 = pybase64.b64encode(data).decode()
    segment = "/v1/sam/m/segment"
    assert routing_key("POST", "/v1/sam/m/embed", "image/png", data) == content
    assert (
        routing_key("POST", segment, "application/json", json.dumps({"image_id": content}).encode())
        == content
    )
    body = json.dumps({"image": {"base64": b64}, "points": [[1, 2]]}).encode()
    assert routing_key("POST", segment, "application/json; charset=utf-8", body) == content
    nuclio = json.dumps({"image": "data:image/png;base64," + b64, "pos_points": [[1, 2]]}).encode()
    assert routing_key("POST", "/api/function_invocations", "application/json", nuclio) == content
    url = json.dumps({"image": {"url": "s3://b/k.png"}}).encode()
    assert routing_key("POST", segment, "application/json", url) == "url:s3://b/k.png"
    upload = httpx.Request("POST", "http://x" + segment, files={"file": ("a.png", data, "image/png")},
                           data={"prompts": json.dumps({"points": [[1, 2]]})})  # fmt: skip
    assert routing_key("POST", segment, upload.headers["content-type"], upload.read()) == content
    by_id = httpx.Request(
        "POST", "http://x" + segment, files={"prompts": (None, json.dumps({"image_id": "ab"}))}
    )
    assert routing_key("POST", segment, by_id.headers["content-type"], by_id.read()) == "ab"
    assert (
        routing_key("GET", "/v1/jobs/123", "", b"") == routing_key("POST", "/v1/jobs", "", b"{}") == JOBS_KEY
    )
    for bad in (b"{not json", b"[1, 2]", json.dumps({"image": {"base64": "@@"}}).encode()):
        assert routing_key("POST", segment, "application/json", bad) is None
    assert routing_key("GET", "/v1/models", "", b"") is None
    step = json.dumps({"image": {"base64": b64}, "states": ["s1", None, "s2"]}).encode()
    assert tracking_states("/v1/track/medianflow/step", "application/json", step) == ["s1", "s2"]
    assert tracking_states("/api/function_invocations", "application/json", step) == ["s1", "s2"]
    assert tracking_states("/v1/sam/m/segment", "application/json", step) == []
    assert tracking_states("/v1/track/medianflow/step", "application/json", b"{bad") == []
    assert pinned_names("/v1/prefetch/r1", "", b"") == ["prefetch/r1"]
    assert created_names("POST", "/v1/prefetch", "application/json", b'{"id": "r1"}') == ["prefetch/r1"]
    assert created_names("GET", "/v1/prefetch", "application/json", b'[{"id": "r1"}]') == []


# --- a real Ray Serve deployment ---

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")


def test_serve_yaml_and_the_rayservice_pass_rays_schema() -> None:
    import tomllib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.scale import ray_app

    config = yaml.safe_load((ROOT / "serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    for document in (config, embedded):
        schema = ServeDeploySchema.model_validate(document)
        (app,) = schema.applications
        module, _, name = app.import_path.partition(":")
        assert module == ray_app.__name__ and getattr(ray_app, name) is ray_app.build_app
        ray_app.build_app(app.args)  # every arg is a labelserve setting with a valid value
    assert embedded["applications"][0]["import_path"] == config["applications"][0]["import_path"]
    # One Ray version everywhere: the cluster's, the pin, and what the tests run.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["ray"][0] == f"ray[data,serve]=={ray.__version__}"
    assert set(extras["ray"]) <= set(extras["test"])
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    with pytest.raises(ValueError, match="ray_max_replica"):
        ray_app.build_app({"ray_max_replica": 4})
    # A replica range autoscales on ongoing requests; equal bounds are a fixed count.
    ranged = ray_app.worker_options(
        Settings(ray_min_replicas=1, ray_max_replicas=4, ray_target_ongoing_requests=3)
    )
    assert "num_replicas" not in ranged
    scaling = ranged["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 3)
    fixed = ray_app.worker_options(Settings(ray_min_replicas=3, ray_max_replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["request_router_config"].request_router_class == ray_app.CONSISTENT_HASH_ROUTER


def test_labelserve_serve_engine_ray_serves_and_stops(tmp_path: Path) -> None:
    """The CLI on its own local Ray instance, with API keys: ready through the ingress, a key needed for a
    click but not for CVAT's Nuclio routes from an allowed address (the client's address reaches the workers),
    then SIGTERM stops it."""
    key = new_key()
    keys = [{"id": "annotator", "hash": hash_key(key), "scopes": ["interactive"]}]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "LABELSERVE_MODELS": MODEL, "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"),
           "LABELSERVE_DATA_DIR": str(tmp_path / "data"), "LABELSERVE_RAY_MIN_REPLICAS": "1",
           "LABELSERVE_RAY_MAX_REPLICAS": "1", "LABELSERVE_RAY_REPLICA_NUM_CPUS": "0.5",
           "LABELSERVE_API_KEYS": json.dumps(keys), "LABELSERVE_CVAT_ALLOW_IPS": "127.0.0.1/32"}  # fmt: skip
    command = [sys.executable, "-m", "server.cli", "serve", "--engine", "ray", "--random-init",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        break
                time.sleep(0.5)
            image = {"content-type": "image/png"}
            refused = client.post(f"/v1/sam/{MODEL}/embed", content=png(0), headers=image)
            assert refused.status_code == 401 and refused.json()["error"]["code"]
            client.headers["x-api-key"] = key
            embedded = client.post(f"/v1/sam/{MODEL}/embed", content=png(0), headers=image)
            assert embedded.status_code == 200 and embedded.headers[REPLICA]
            assert click(client, embedded.json()["image_id"]).json()["cache_tier"] == "l1"
            del client.headers["x-api-key"]
            assert client.get("/api/functions").status_code == 200  # CVAT, by its address
            assert client.get("/v1/models").status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="module")
def redis_l2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def overrides(tmp_path_factory: pytest.TempPathFactory, redis_l2: RedisServer) -> dict:
    tmp = tmp_path_factory.mktemp("ray")
    return {
        "models": [MODEL],
        "random_init": True,
        "weights_dir": str(tmp / "weights"),
        "data_dir": str(tmp / "data"),
        "cache_redis_url": redis_l2.url,
        "ray_min_replicas": 2,
        "ray_max_replicas": 2,
        "ray_max_ongoing_requests": 1,  # one click at a time: a second concurrent one must spill
        "ray_max_queued_requests": MAX_QUEUED,
        "ray_replica_num_cpus": 0.5,
        "busy_retry_after_s": 2,
    }


@pytest.fixture(scope="module")
def ray_url(overrides: dict) -> Iterator[str]:
    from ray import serve

    from server.scale.ray_app import build_app

    # The replicas are Ray worker processes: they import this checkout and never report usage.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(overrides), name="labelserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(ray_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        yield client


def replica_stats(http: httpx.Client) -> dict[str, dict]:
    """Each worker replica's /v1/cache/stats: a request with no image goes to a replica at random."""
    found: dict[str, dict] = {}
    for _ in range(60):
        reply = http.get("/v1/cache/stats")
        assert reply.status_code == 200, reply.text
        found[reply.headers[REPLICA]] = reply.json()
        if len(found) == 2:
            return found
    raise AssertionError(f"only {sorted(found)} answered /v1/cache/stats")


def encodes(stats: dict) -> int:
    return sum(sum(encoder["done"].values()) for encoder in stats["encoders"].values())


def click(http: httpx.Client, content_id: str, x: float = 100, y: float = 120) -> httpx.Response:
    body = {"image_id": content_id, "points": [[x, y]], "formats": ["coco_rle"]}
    return http.post(f"/v1/sam/{MODEL}/segment", json=body)


@pytest.fixture(scope="module")
def embedded(http: httpx.Client) -> dict[str, str]:
    """Images embedded through Ray until both replicas own one, three in all: content id -> its replica."""
    owners: dict[str, str] = {}
    for seed in range(16):
        reply = http.post(f"/v1/sam/{MODEL}/embed", content=png(seed), headers={"content-type": "image/png"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["cache_tier"] == "encode"
        owners[reply.json()["image_id"]] = reply.headers[REPLICA]
        if len(owners) >= 3 and len(set(owners.values())) == 2:
            return owners
    raise AssertionError(f"16 images all hashed to one replica: {owners}")


def test_clicks_land_on_the_replica_that_embedded_the_image(http: httpx.Client, embedded: dict) -> None:
    for content_id, owner in embedded.items():
        for step in range(3):
            reply = click(http, content_id, 60 + 40 * step, 100)
            assert reply.status_code == 200, reply.text
            assert reply.headers[REPLICA] == owner
            assert reply.json()["cache_tier"] == "l1"
        again = http.post(
            f"/v1/sam/{MODEL}/embed", content=png_of(content_id), headers={"content-type": "image/png"}
        )
        assert again.headers[REPLICA] == owner and again.json()["cache_tier"] == "l1"
    stats = replica_stats(http)
    per_replica = Counter(embedded.values())
    assert {replica: encodes(s) for replica, s in stats.items()} == dict(per_replica)  # one encode per image


def png_of(content_id: str) -> bytes:
    from server.inputs.images import image_id

    for seed in range(16):
        if image_id(png(seed)) == content_id:
            return png(seed)
    raise KeyError(content_id)


def test_a_full_owner_spills_to_its_neighbour_which_reads_l2(http: httpx.Client, embedded: dict) -> None:
    content_id, owner = next(iter(embedded.items()))
    before = sum(encodes(s) for s in replica_stats(http).values())
    replies: list[httpx.Response] = []
    with ThreadPoolExecutor(3) as pool:
        for _ in range(5):  # concurrent clicks on one image: the owner serves one at a time (max_ongoing 1)
            replies += pool.map(lambda i: click(http, content_id, 50 + i, 80), range(3))
            if any(r.status_code == 200 and r.headers[REPLICA] != owner for r in replies):
                break
    served = [r for r in replies if r.status_code == 200]
    assert all(r.status_code in (200, 429) for r in replies), [r.text for r in replies]
    spilled = [r for r in served if r.headers[REPLICA] != owner]
    assert spilled, "no click spilled from a busy owner"
    tiers = Counter(r.json()["cache_tier"] for r in spilled)
    assert tiers["l2"] == 1 and set(tiers) <= {"l1", "l2"}, tiers  # read once from L2, then its own L1
    assert all(r.json()["cache_tier"] == "l1" for r in served if r.headers[REPLICA] == owner)
    assert sum(encodes(s) for s in replica_stats(http).values()) == before  # never re-encoded


def test_a_flood_is_refused_with_429_and_retry_after(http: httpx.Client, embedded: dict) -> None:
    ids = list(embedded)
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda i: click(http, ids[i % len(ids)], 30 + i, 60), range(48)))
    codes = Counter(r.status_code for r in replies)
    assert set(codes) <= {200, 429}, codes
    assert codes[429] > 0, codes
    for reply in replies:
        if reply.status_code == 429:
            assert reply.headers["retry-after"] == "2", reply.text
            assert reply.json()["error"]["code"] == "worker_queue_full", reply.text


def test_results_equal_the_plain_servers(http: httpx.Client, embedded: dict, overrides: dict) -> None:
    plain = {k: v for k, v in overrides.items() if not k.startswith(("ray_", "cache_redis"))}
    settings = make_settings(Path(plain.pop("data_dir")), **plain)
    ids = list(embedded)[:2]
    with TestClient(create_app(settings, load_models_in_background=False)) as local:
        for content_id in ids:
            image = {"base64": pybase64.b64encode(png_of(content_id)).decode()}
            body = {"image": image, "points": [[90, 110]], "labels": [1], "formats": ["coco_rle", "polygons"]}
            mine, theirs = (
                http.post(f"/v1/sam/{MODEL}/segment", json=body),
                local.post(f"/v1/sam/{MODEL}/segment", json=body),
            )
            assert mine.status_code == theirs.status_code == 200, (mine.text, theirs.text)
            assert mine.headers[REPLICA] == embedded[content_id]
            assert mine.json()["masks"] == theirs.json()["masks"]
            assert mine.json()["masks"][0]["area"] > 0  # a mask, not two empty replies


def test_cvat_nuclio_routes_go_through_ray_to_the_owner(http: httpx.Client, embedded: dict) -> None:
    functions = http.get("/api/functions")
    assert functions.status_code == 200 and functions.json()
    content_id, owner = list(embedded.items())[-1]
    before = replica_stats(http)
    payload = {"image": pybase64.b64encode(png_of(content_id)).decode(), "pos_points": [[100, 100]],
               "neg_points": []}  # fmt: skip
    function = {"x-nuclio-function-name": "labelserve-" + MODEL.replace("_", "-")}
    reply = http.post("/api/function_invocations", json=payload, headers=function)
    assert reply.status_code == 200, reply.text
    assert reply.headers[REPLICA] == owner
    after = replica_stats(http)
    assert {r: encodes(s) for r, s in after.items()} == {r: encodes(s) for r, s in before.items()}
    bad = http.post("/v1/sam/no_such_model/segment", json={"image_id": content_id, "points": [[1, 1]]})
    assert bad.status_code == 404 and "error" in bad.json()


def test_an_ndjson_propagate_streams_through_serve(http: httpx.Client, tmp_path: Path) -> None:
    video = SyntheticVideo(frames=20)
    truth = video.write(tmp_path / "v.mp4")
    body = {"video": {"base64": pybase64.b64encode((tmp_path / "v.mp4").read_bytes()).decode()}, "start": 2,
            "stop": 16, "shapes": [{"type": "rectangle", "points": list(truth[2][1])}]}  # fmt: skip
    with http.stream("POST", "/v1/track/medianflow/propagate", json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-ndjson"
        assert "content-length" not in reply.headers  # streamed, not buffered whole by the ingress
        lines = [orjson.loads(line) for line in reply.iter_lines() if line]
    assert [line["frame"] for line in lines] == list(range(2, 16))
    assert (
        min(box_iou(tuple(line["shapes"][0]["points"]), truth[line["frame"]][1]) for line in lines[1:]) > 0.8
    )


def test_tracking_steps_go_to_the_replica_holding_their_state(http: httpx.Client) -> None:
    """Each frame hashes to its own replica, but a step's states live where the init created them."""
    frames = [png(seed) for seed in range(20, 28)]
    keys = {routing_key("POST", "/v1/track/medianflow", "image/png", frame) for frame in frames}
    assert len(keys) == len(frames)
    box = {"type": "rectangle", "points": [100, 80, 180, 160]}
    image = {"base64": pybase64.b64encode(frames[0]).decode()}
    started = http.post("/v1/track/medianflow", json={"image": image, "shapes": [box]})
    assert started.status_code == 200, started.text
    holder, states = started.headers[REPLICA], started.json()["states"]
    served = set()
    for frame in frames[1:]:
        body = {"image": {"base64": pybase64.b64encode(frame).decode()}, "states": states}
        step = http.post("/v1/track/medianflow/step", json=body)
        assert step.status_code == 200, step.text  # 404 unknown_track_state on any other replica
        served.add(step.headers[REPLICA])
    assert served == {holder}


def test_a_prefetch_runs_status_is_asked_of_the_replica_running_it(http: httpx.Client) -> None:
    images = [{"base64": pybase64.b64encode(png(seed)).decode()} for seed in (30, 31)]
    run = http.post("/v1/prefetch", json={"model": MODEL, "images": images})
    assert run.status_code == 202, run.text
    holder = run.headers[REPLICA]
    # Until the run is over: without the pin, any replica (the other one answers 404). Waiting for the end
    # also keeps its encodes out of the next test's counts.
    deadline = time.monotonic() + 120
    while True:
        status = http.get(f"/v1/prefetch/{run.json()['id']}")
        assert status.status_code == 200 and status.headers[REPLICA] == holder, status.text
        if status.json()["state"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, status.text
        time.sleep(0.5)
    assert status.json()["state"] == "completed" and status.json()["done"] == 2, status.text


def test_a_killed_owner_is_replaced_without_a_reencode(http: httpx.Client, embedded: dict) -> None:
    """Last: it changes the replica set. The dead replica's images are served by the others from L2 (or an L1
    a spill filled), and nothing is encoded again, neither by the survivor nor by the replacement replica."""
    owner = Counter(embedded.values()).most_common(1)[0][0]
    orphans = [content_id for content_id, replica in embedded.items() if replica == owner]
    survivors = {r: encodes(s) for r, s in replica_stats(http).items() if r != owner}
    replica = ray.get_actor(f"SERVE_REPLICA::labelserve#LabelWorker#{owner}", namespace="serve")
    ray.kill(replica, no_restart=True)
    deadline = time.monotonic() + 90
    for content_id in orphans:
        while True:
            reply = click(http, content_id)
            assert reply.status_code in (200, 503), reply.text  # 503 + Retry-After while the ring catches up
            if reply.status_code == 200:
                break
            assert reply.headers["retry-after"] and time.monotonic() < deadline
            time.sleep(0.5)
        assert reply.headers[REPLICA] != owner and reply.json()["cache_tier"] in ("l1", "l2")
    now: dict[str, dict] = {}
    while len(now) < 2:  # until the replacement replica answers too
        assert time.monotonic() < deadline, f"only {sorted(now)} answered"
        reply = http.get("/v1/cache/stats")
        if reply.status_code == 200:
            now[reply.headers[REPLICA]] = reply.json()
    assert owner not in now and set(survivors) < set(now)
    assert sum(encodes(s) for s in now.values()) == sum(survivors.values())
