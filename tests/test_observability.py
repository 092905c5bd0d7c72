"""Request ids, the audit log, JSON logs and /metrics, on an app with keys, MobileSAM and a real detector."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.auth import hash_key, new_key
from server.api.metrics import cache_metrics, job_metrics
from server.api.routes.jobs import source_reference
from server.app import create_app
from server.jobs.store import JobStore
from server.ops.audit import audit_log
from server.ops.logs import JsonFormatter, RequestIdFilter
from server.ops.metrics import Metrics
from server.ops.request_context import begin, end, note_image_bytes, redact_url
from server.services.collections import Source

from .conftest import encode_image, fall_checkpoint, make_settings, synthetic_scene

KEY = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
SCENE = encode_image(synthetic_scene(96, 64, seed=7))
SCENE_B64 = base64.b64encode(SCENE).decode()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    tmp = tmp_path_factory.mktemp("observability")
    settings = make_settings(
        tmp,
        data_dir=tmp / "data",
        detector_paths={"fall": str(fall_checkpoint())},
        api_keys=[{"id": "ops", "hash": hash_key(KEY), "scopes": ["interactive", "jobs", "metrics"]}],
    )
    return create_app(settings, load_models_in_background=False)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def audit_lines() -> Iterator[Collect]:
    collect = Collect()
    audit_log.addHandler(collect)
    yield collect
    audit_log.removeHandler(collect)


def audited(collect: Collect, request_id: str) -> dict:
    lines = [json.loads(r.getMessage()) for r in collect.records]
    found = [line for line in lines if line["request_id"] == request_id]
    assert len(found) == 1, lines
    return found[0]


def scrape(client: TestClient) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def label_values(samples: dict[str, dict[tuple, float]], name: str, label: str) -> set[str]:
    return {dict(labels)[label] for labels in samples.get(name, {}) if label in dict(labels)}


# ---- request ids -----------------------------------------------------------------------------------------
def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "trace-42.a:b"}).headers["x-request-id"] == (
        "trace-42.a:b"
    )
    for bad in ("x" * 129, "has space", "-starts-with-dash", "a;b", "a,b"):
        generated = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert generated != bad and len(generated) == 32 and int(generated, 16) >= 0
    first, second = (client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert first != second
    refused = client.get("/v1/models", headers={"Authorization": "", "X-Request-ID": "no-key"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key"
    assert client.get("/v1/nope", headers={"X-Request-ID": "lost"}).headers["x-request-id"] == "lost"


# ---- audit log -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(client: TestClient, audit_lines: Collect) -> dict:
    """One embed of an inline (base64) image, the module's only encode."""
    response = client.post(
        "/v1/sam/mobile_sam/embed", json={"image": {"base64": SCENE_B64}}, headers={"X-Request-ID": "embed-1"}
    )
    assert response.status_code == 200
    return response.json()


def test_audit_line_of_an_inline_image_names_its_hash_never_its_bytes(
    embedded: dict, audit_lines: Collect
) -> None:
    line = audited(audit_lines, "embed-1")
    assert line["key"] == "ops" and line["listener"] == "api" and line["client"] == "testclient"
    assert (line["method"], line["route"], line["path"]) == (
        "POST",
        "/v1/sam/{model}/embed",
        "/v1/sam/mobile_sam/embed",
    )
    assert line["image"] == "sha256:" + hashlib.sha256(SCENE).hexdigest() == "sha256:" + embedded["image_id"]
    assert line["status"] == 200 and line["duration_ms"] > 0
    assert set(line) == {
        "time", "request_id", "key", "listener", "client", "method", "route", "path", "image", "status",
        "duration_ms",
    }  # fmt: skip
    logged = "".join(r.getMessage() for r in audit_lines.records)
    assert SCENE_B64[200:260] not in logged and KEY not in logged


def test_audit_line_of_a_url_drops_credentials_and_query(client: TestClient, audit_lines: Collect) -> None:
    url = "http://user:pw@127.0.0.1:9/bucket/img.png?X-Amz-Signature=SECRET#part"
    response = client.post(
        "/v1/sam/mobile_sam/embed", json={"image": {"url": url}}, headers={"X-Request-ID": "by-url"}
    )
    assert response.status_code == 403  # a loopback URL; refused, but audited all the same
    line = audited(audit_lines, "by-url")
    assert line["image"] == "http://127.0.0.1:9/bucket/img.png" and line["status"] == 403
    assert "SECRET" not in json.dumps(line) and "pw" not in line["image"]


def test_audit_line_of_detection_hashes_the_upload(client: TestClient, audit_lines: Collect) -> None:
    """Detection never hashes the image itself: the audit log does, off the event loop."""
    response = client.post(
        "/v1/detect/fall",
        files={"file": ("scene.png", SCENE, "image/png")},
        data={"params": "{}"},
        headers={"X-Request-ID": "detect-1"},
    )
    assert response.status_code == 200
    line = audited(audit_lines, "detect-1")
    assert line["image"] == "sha256:" + hashlib.sha256(SCENE).hexdigest()
    samples = scrape(client)
    assert value(samples, "labelserve_detect_batch_size_count", model="fall") >= 1
    assert value(samples, "labelserve_detect_batch_size_bucket", model="fall", le="+Inf") >= 1
    assert label_values(samples, "labelserve_detect_queue_depth", "model") == {"fall"}
    assert value(
        samples, "labelserve_stage_duration_seconds_count", route="/v1/detect/{model}", stage="detect"
    )


def test_audit_line_of_a_job_names_its_source(
    client: TestClient, audit_lines: Collect, tmp_path: Path
) -> None:
    spec = {
        "source": {"directory": str(tmp_path / "missing")},
        "detector": "fall",
        "output": {"format": "coco", "directory": str(tmp_path / "out")},
    }
    response = client.post("/v1/jobs", json=spec, headers={"X-Request-ID": "job-1"})
    assert response.status_code == 400
    line = audited(audit_lines, "job-1")
    assert line["image"] == str(tmp_path / "missing") and line["route"] == "/v1/jobs"


def test_job_source_references_carry_no_secrets() -> None:
    assert source_reference(Source(urls=["https://u:p@h.example/a.jpg?sig=S", "s3://b/k.png"])) == (
        "https://h.example/a.jpg and 1 more"
    )
    assert source_reference(Source(manifest="s3://bucket/task/manifest.jsonl")) == (
        "s3://bucket/task/manifest.jsonl"
    )
    task = Source(cvat_task={"task_id": 7, "url": "https://cvat.example/", "token": "T0KEN"})
    assert source_reference(task) == "cvat task 7 at https://cvat.example/"


def test_redact_url() -> None:
    assert (
        redact_url("https://a:b@host:8443/p/q.jpg?X-Amz-Credential=c&sig=s#f") == "https://host:8443/p/q.jpg"
    )
    assert redact_url("s3://bucket/key.png") == "s3://bucket/key.png"
    assert redact_url("/data/images") == "/data/images"


def test_inline_bytes_nobody_hashed_are_hashed_once_for_the_audit() -> None:
    context, token = begin("unit")
    try:
        note_image_bytes(b"abc")
        assert context.image_unhashed
        assert context.image_reference() == "sha256:" + hashlib.sha256(b"abc").hexdigest()
        assert not context.image_unhashed
    finally:
        end(token)


# ---- JSON logs and errors --------------------------------------------------------------------------------
def test_an_unexpected_error_is_a_500_with_its_request_id_in_the_json_logs(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    collect = Collect()
    collect.addFilter(RequestIdFilter())
    collect.setFormatter(JsonFormatter())
    logger = logging.getLogger("labelserve")
    logger.addHandler(collect)

    def broken() -> list[dict]:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(app.state.services.registry, "describe", broken)
    try:
        response = TestClient(app, headers=AUTH, raise_server_exceptions=False).get("/v1/models")
    finally:
        logger.removeHandler(collect)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    request_id = response.headers["x-request-id"]
    lines = [json.loads(collect.format(r)) for r in collect.records]
    error = next(line for line in lines if line["level"] == "ERROR")
    assert error["request_id"] == request_id and "planted bug" in error["exception"]
    assert error["logger"] == "labelserve" and "GET /v1/models" in error["message"]
    audit = next(line for line in lines if line["logger"] == "labelserve.audit")
    assert (audit["request_id"], audit["status"], audit["key"]) == (request_id, 500, "ops")
    assert "message" not in audit  # the audit fields are the line's fields


def test_logs_outside_requests_carry_no_request_id() -> None:
    record = logging.LogRecord("labelserve.jobs", logging.INFO, __file__, 1, "job %s done", ("j1",), None)
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job j1 done" and "request_id" not in line and line["level"] == "INFO"


# ---- /metrics --------------------------------------------------------------------------------------------
def test_metrics_parse_and_move_with_requests(client: TestClient, embedded: dict) -> None:
    before = scrape(client)
    segment = client.post(
        "/v1/sam/mobile_sam/segment", json={"image_id": embedded["image_id"], "points": [[30, 30]]}
    )
    assert segment.status_code == 200
    after = scrape(client)
    route = {"listener": "api", "method": "POST", "route": "/v1/sam/{model}/segment"}
    assert value(after, "labelserve_requests_total", **route, status="2xx") == (
        value(before, "labelserve_requests_total", **route, status="2xx") + 1
    )
    assert value(after, "labelserve_request_duration_seconds_count", **route) == (
        value(before, "labelserve_request_duration_seconds_count", **route) + 1
    )
    embed_stage = {"route": "/v1/sam/{model}/embed"}
    for stage in ("read", "hash", "decode_image", "encode"):
        assert value(after, "labelserve_stage_duration_seconds_count", **embed_stage, stage=stage) >= 1, stage
    assert value(
        after, "labelserve_stage_duration_seconds_count", route=route["route"], stage="decode_mask"
    ) == (
        value(before, "labelserve_stage_duration_seconds_count", route=route["route"], stage="decode_mask")
        + 1
    )
    assert value(after, "labelserve_cache_hits_total", tier="embeddings") == (
        value(before, "labelserve_cache_hits_total", tier="embeddings") + 1
    )
    assert value(after, "labelserve_cache_misses_total", tier="embeddings") >= 1
    assert value(after, "labelserve_cache_entries", tier="embeddings") >= 1
    assert value(after, "labelserve_cache_bytes", tier="embeddings") > 0
    assert value(after, "labelserve_model_state", model="mobile_sam", kind="segmenter", state="loaded") == 1
    assert value(after, "labelserve_model_state", model="mobile_sam", kind="segmenter", state="loading") == 0
    assert value(after, "labelserve_model_state", model="sam_vit_h", kind="segmenter", state="disabled") == 1
    assert value(after, "labelserve_model_load_seconds", model="fall") > 0
    assert "labelserve_jobs" in after and "labelserve_track_states" in after
    assert value(after, "labelserve_requests_in_flight", listener="api") == 1  # the scrape itself
    assert after["process_resident_memory_bytes"]
    assert not any(name.startswith("labelserve_gpu_") for name in after)  # a CPU-only app


def test_cache_metrics_read_every_tier_the_service_reports() -> None:
    """The shape the L2 tiers and encoder queues give SamService.stats(): later tiers need no new code."""
    stats = {
        "embeddings": {"tier": "l1", "entries": 3, "bytes": 300, "max_bytes": 1000, "hits": 5, "misses": 2,
                       "evictions": 1, "inflight": 0, "inflight_waits": 4, "uncacheable": 0},
        "l2": {"tier": "l2", "kind": "redis", "hits": 7, "misses": 1, "writes": 2, "errors": 1, "bytes": None,
               "read_ms_avg": 1.5, "state": "closed", "opened": 0},
        "encoders": {"mobile_sam": {"queued": {"interactive": 1, "background": 6}, "running": None}},
        "refinement": {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "evictions": 0, "reused": 2},
        "disk": None,
    }  # fmt: skip
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in cache_metrics(stats) for s in f.samples
    }
    assert samples[("labelserve_cache_hits_total", (("tier", "l2"),))] == 7
    assert samples[("labelserve_cache_evictions_total", (("tier", "embeddings"),))] == 1
    assert samples[("labelserve_cache_bytes", (("tier", "embeddings"),))] == 300
    assert samples[("labelserve_cache_events_total", (("event", "errors"), ("tier", "l2")))] == 1
    assert samples[("labelserve_cache_events_total", (("event", "reused"), ("tier", "refinement")))] == 2
    depth = (("model", "mobile_sam"), ("priority", "background"))
    assert samples[("labelserve_encode_queue_depth", depth)] == 6
    assert not any(dict(labels).get("tier") in ("disk", "encoders") for _, labels in samples)
    assert ("labelserve_cache_bytes", (("tier", "l2"),)) not in samples  # unknown size: left out


def test_job_metrics_count_states_and_active_progress(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create_job("j1", "{}", [(f"/img/{i}.jpg", f"{i}.jpg") for i in range(5)], now=1.0)
    store.create_job("j2", "{}", [("/img/a.jpg", "a.jpg")], now=2.0)
    store.transition("j2", "cancelled", only_from=["queued"], now=3.0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in job_metrics(store) for s in f.samples
    }
    assert samples[("labelserve_jobs", (("state", "queued"),))] == 1
    assert samples[("labelserve_jobs", (("state", "cancelled"),))] == 1
    assert samples[("labelserve_jobs", (("state", "running"),))] == 0
    assert samples[("labelserve_job_images", (("job", "j1"), ("status", "pending")))] == 5
    assert not any(dict(labels).get("job") == "j2" for _, labels in samples)
    store.close()


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # the global registry would refuse the second
    first.requests.labels("api", "/x", "GET", "2xx").inc()
    assert (
        second.registry.get_sample_value(
            "labelserve_requests_total", {"listener": "api", "route": "/x", "method": "GET", "status": "2xx"}
        )
        is None
    )
