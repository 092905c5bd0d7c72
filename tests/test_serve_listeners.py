"""`labelserve serve` as operators run it: the API port with keys, the CVAT listener on a second port, JSON
logs, the audit log file, and a clean stop on SIGTERM."""

from __future__ import annotations

import base64
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from server.api.auth import hash_key, new_key

from .conftest import encode_image, synthetic_scene
from .server_process import ServerProcess, free_port


def wait_until_up(http: httpx.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_serve_with_a_cvat_listener_json_logs_and_an_audit_file(tmp_path: Path) -> None:
    key = new_key()
    keys = tmp_path / "keys.jsonl"
    keys.write_text(json.dumps({"id": "ops", "hash": hash_key(key), "scopes": ["interactive"]}) + "\n")
    cvat_port = free_port()
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp_path / "data"),
        "LABELSERVE_MODELS": "mobile_sam",
        "LABELSERVE_API_KEYS_FILE": str(keys),
        "LABELSERVE_CVAT_PORT": str(cvat_port),
        "LABELSERVE_CVAT_ALLOW_IPS": "127.0.0.0/8,::1",
        "LABELSERVE_LOG_FORMAT": "json",
        "LABELSERVE_AUDIT_LOG_FILE": str(tmp_path / "audit.log"),
    }
    frame = base64.b64encode(encode_image(synthetic_scene(64, 48, seed=1))).decode()
    with (
        ServerProcess(env, tmp_path / "server.log", random_init=True) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{cvat_port}", timeout=300) as cvat,
    ):
        assert server.http.get("/v1/models").status_code == 401
        assert server.http.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        wait_until_up(cvat)
        assert "labelserve-mobile-sam" in cvat.get("/api/functions").json()
        click = cvat.post(
            "/api/function_invocations",
            json={"image": frame, "pos_points": [[20, 20]], "neg_points": []},
            headers={"x-nuclio-function-name": "labelserve-mobile-sam", "X-Request-ID": "cvat-click"},
        )
        assert click.status_code == 200 and click.json()["shapes"][0]["type"] == "mask"
        assert cvat.get("/v1/models", headers={"X-API-Key": key}).status_code == 404
        server.stop()
        assert server.process.returncode == 0, server.log_tail()

    logged = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    running = [line["message"] for line in logged if line["logger"] == "uvicorn.error"]
    assert any(f":{server.port}" in m for m in running) and any(f":{cvat_port}" in m for m in running)
    assert any(line["logger"] == "labelserve.models" for line in logged)

    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    by_id = {line["request_id"]: line for line in audit}
    click_line = by_id["cvat-click"]
    assert (click_line["listener"], click_line["key"], click_line["route"]) == (
        "cvat",
        "cvat",
        "/api/function_invocations",
    )
    assert click_line["image"].startswith("sha256:") and frame[40:100] not in json.dumps(audit)
    assert {
        (line["listener"], line["key"], line["status"]) for line in audit if line["path"] == "/v1/models"
    } == {
        ("api", "anonymous", 401),
        ("api", "ops", 200),
        ("cvat", "cvat", 404),
    }
    assert key not in server.log.read_text() + (tmp_path / "audit.log").read_text()


def test_sigterm_under_load_answers_every_request_and_exits_promptly(tmp_path: Path) -> None:
    """Twelve clicks on twelve new images queue twelve encodes. On SIGTERM the running encode finishes and
    the queued ones are answered 503 `shutting_down` with Retry-After at once: no client is left without a
    reply, and the stop takes about one encode, not twelve."""
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp_path / "data"),
        "LABELSERVE_MODELS": "mobile_sam",
        "LABELSERVE_MAX_INFLIGHT_INTERACTIVE": "64",
    }
    images = [encode_image(synthetic_scene(96, 64, seed=100 + i)) for i in range(12)]
    with ServerProcess(env, tmp_path / "server.log", random_init=True) as server:
        started = time.monotonic()
        first = server.http.post(
            "/v1/sam/mobile_sam/embed",
            content=encode_image(synthetic_scene(96, 64, seed=1)),
            headers={"Content-Type": "image/png"},
        )
        assert first.status_code == 200, first.text
        encode_s = time.monotonic() - started

        def click(data: bytes) -> httpx.Response | Exception:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                try:
                    return client.post(
                        "/v1/sam/mobile_sam/segment",
                        files={"file": ("frame.png", data, "image/png")},
                        data={"prompts": '{"points": [[20, 20]]}'},
                    )
                except httpx.TransportError as exc:
                    return exc

        with ThreadPoolExecutor(len(images)) as pool:
            replies = [pool.submit(click, data) for data in images]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # every request is in and waits for the encoder
                encoder = server.http.get("/v1/cache/stats").json()["encoders"].get("mobile_sam", {})
                if encoder.get("queued", {}).get("interactive", 0) >= len(images) - 2:
                    break
                time.sleep(0.05)
            queued = encoder["queued"]["interactive"]
            assert queued >= len(images) - 2, encoder
            stopping = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(120)
            stopped_s = time.monotonic() - stopping
            results = [reply.result() for reply in replies]

    assert server.process.returncode == 0, server.log_tail()
    assert not [r for r in results if isinstance(r, Exception)], results  # everyone got an answer
    statuses = sorted(r.status_code for r in results)
    refused = [r for r in results if r.status_code == 503]
    assert set(statuses) <= {200, 503} and len(refused) >= queued - 1, statuses
    assert all(r.json()["error"]["code"] == "shutting_down" and r.headers["Retry-After"] for r in refused)
    # Before the drain, the stop waited for every queued encode (~queued × encode_s), then for up to 12 s of
    # the interpreter's final garbage collection.
    assert stopped_s < 2 * encode_s + 5, (stopped_s, encode_s, queued)
