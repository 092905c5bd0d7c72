"""Images, job sources and job outputs in S3-compatible object storage, against moto's S3 server over HTTP on
loopback (IAM authentication on, buckets in a B2 region), with a header-contract check on every request,
and a loopback endpoint for the faults no S3 server produces on demand (503 SlowDown, no answer)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.cli import prelabel as cli
from server.errors import ApiError
from server.inputs import urls as sources
from server.inputs.manifest import manifest_names
from server.inputs.objectstore.store import store_for
from server.inputs.urls import READERS
from server.jobs.engine import LocalEngine
from server.jobs.outputs import STAGING_DIR
from server.jobs.spec import JobSpec
from server.settings import Settings, get_settings
from tests.conftest import encode_image, fall_checkpoint, make_settings, synthetic_scene
from tests.jobs_helpers import RectDetector, wait_for, write_dataset
from tests.s3_helpers import REGION, FaultyS3, HeaderContract, MotoS3, moto_s3

BUCKET, VERSIONED, SCOPED = "frames", "frames-versioned", "team-frames"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        server.create_bucket(SCOPED)
        server.create_bucket(VERSIONED, versioned=True)
        yield server


@pytest.fixture
def contract() -> Iterator[HeaderContract]:
    """Every test that talks to S3 watches its clients; none may send a header B2 rejects."""
    found = HeaderContract()
    yield found
    assert found.violations == []


def s3_settings(
    moto: MotoS3, tmp: Path, contract: HeaderContract | None = None, **overrides: object
) -> Settings:
    profiles = {
        "b2": moto.profile([BUCKET, VERSIONED]),
        "team": moto.profile([SCOPED], prefix="team-a/"),
    }
    settings = make_settings(tmp, storage_profiles=profiles, data_dir=tmp / "data", **overrides)
    if contract is not None:
        contract.watch(settings)
    return settings


def read(url: str, settings: Settings, purpose: str = "interactive") -> bytes:
    return asyncio.run(READERS["s3"](url, settings, purpose=purpose))  # type: ignore[arg-type]


def refused(url: str, settings: Settings) -> ApiError:
    with pytest.raises(ApiError) as caught:
        read(url, settings)
    return caught.value


def put(moto: MotoS3, key: str, body: bytes, bucket: str = BUCKET) -> str | None:
    """Returns the new object's version id (None outside versioned buckets)."""
    return moto.client().put_object(Bucket=bucket, Key=key, Body=body).get("VersionId")


def gets(contract: HeaderContract) -> list[dict[str, str]]:
    return [headers for operation, headers in contract.sent if operation == "GetObject"]


# -- the B2 client contract ------------------------------------------------------------------------------


def test_every_operation_is_free_of_the_headers_b2_rejects(
    moto: MotoS3, contract: HeaderContract, tmp_path: Path
) -> None:
    # The check itself can fail: boto3's default configuration sends checksum headers on GET and PUT.
    default = HeaderContract()
    plain = boto3.session.Session().client(
        "s3",
        endpoint_url=moto.endpoint,
        aws_access_key_id=moto.admin.id,
        aws_secret_access_key=moto.admin.secret,
        config=Config(region_name=REGION),
    )
    default.attach(plain)
    plain.put_object(Bucket=BUCKET, Key="contract/plain.bin", Body=b"x")
    plain.get_object(Bucket=BUCKET, Key="contract/plain.bin")
    assert {op for op, _ in default.violations} == {"PutObject", "GetObject"}

    settings = s3_settings(moto, tmp_path, contract)
    store = store_for(settings)
    put(moto, "contract/a.png", b"image bytes")
    version = put(moto, "contract/v.png", b"versioned bytes", bucket=VERSIONED)
    manifest = b'{"version":"1.1"}\n{"type":"images"}\n{"name":"a","extension":".png"}\n'
    put(moto, "contract/manifest.jsonl", manifest)

    assert read(f"s3://{BUCKET}/contract/a.png", settings) == b"image bytes"  # GET
    assert read(f"s3://{BUCKET}/contract/a.png", settings) == b"image bytes"  # conditional GET: 304
    assert read(f"s3://{VERSIONED}/contract/v.png?versionId={version}", settings, "job") == b"versioned bytes"
    assert list(store.list_keys(f"s3://{BUCKET}/contract", (".png",))) == ["a.png"]
    assert list(manifest_names(store.lines(f"s3://{BUCKET}/contract/manifest.jsonl"), "m")) == ["a.png"]
    store.check_writable(f"s3://{BUCKET}/contract/out")
    (tmp_path / "out" / "labels").mkdir(parents=True)
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB: two parts with a 5 MiB threshold (moto's minimum part)
    (tmp_path / "out" / "labels" / "big.bin").write_bytes(big)
    (tmp_path / "out" / "data.yaml").write_text("nc: 0\n")
    uploaded = store.upload_tree(
        tmp_path / "out", f"s3://{BUCKET}/contract/out/", multipart_threshold=5 << 20
    )

    assert uploaded == [f"s3://{BUCKET}/contract/out/labels/big.bin", f"s3://{BUCKET}/contract/out/data.yaml"]
    assert moto.client().get_object(Bucket=BUCKET, Key="contract/out/labels/big.bin")["Body"].read() == big
    assert contract.operations >= {
        "GetObject",
        "ListObjectsV2",
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
    }
    assert contract.violations == []
    assert any("If-None-Match" in headers for headers in gets(contract))


def test_cached_bytes_are_revalidated_by_etag(moto: MotoS3, contract: HeaderContract, tmp_path: Path) -> None:
    settings = s3_settings(moto, tmp_path, contract)
    cache = store_for(settings).cache
    url = f"s3://{BUCKET}/reval/a.png"
    put(moto, "reval/a.png", b"v1")
    assert read(url, settings) == b"v1"
    assert read(url, settings) == b"v1"
    assert "If-None-Match" not in gets(contract)[0] and "If-None-Match" in gets(contract)[1]
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    put(moto, "reval/a.png", b"v2")  # the same key, new bytes: never served stale
    assert read(url, settings) == b"v2"

    # Within a revalidation window the store is not asked again, at the price of staleness up to the window.
    windowed = s3_settings(moto, tmp_path, contract, s3_revalidate_after_s=60)
    assert read(url, windowed) == b"v2"
    put(moto, "reval/a.png", b"v3")
    sent = len(gets(contract))
    assert read(url, windowed) == b"v2"
    assert len(gets(contract)) == sent

    # A version id names bytes that never change: one GET, then none.
    first = put(moto, "reval/v.png", b"first", bucket=VERSIONED)
    put(moto, "reval/v.png", b"second", bucket=VERSIONED)
    assert read(f"s3://{VERSIONED}/reval/v.png?versionId={first}", settings) == b"first"
    sent = len(gets(contract))
    assert read(f"s3://{VERSIONED}/reval/v.png?versionId={first}", settings) == b"first"
    assert len(gets(contract)) == sent
    assert read(f"s3://{VERSIONED}/reval/v.png", settings) == b"second"

    # Jobs read each image once: their reads do not fill the cache.
    entries = len(cache)
    put(moto, "reval/job.png", b"job")
    assert read(f"s3://{BUCKET}/reval/job.png", settings, "job") == b"job"
    assert len(cache) == entries


def test_scope_and_store_errors_are_clear(moto: MotoS3, contract: HeaderContract, tmp_path: Path) -> None:
    settings = s3_settings(moto, tmp_path, contract, max_request_bytes=1000)
    put(moto, "scope/a.png", b"a")
    put(moto, "team-a/ok.png", b"ok", bucket=SCOPED)
    put(moto, "team-b/secret.png", b"no", bucket=SCOPED)
    put(moto, "scope/big.png", b"x" * 1001)

    cases = {
        "s3://elsewhere/a.png": (403, "s3_bucket_forbidden", "allow-list"),
        f"s3://{SCOPED}/team-b/secret.png": (403, "s3_key_forbidden", "'team-a/'"),
        f"s3://{SCOPED}/team-a/../team-b/secret.png": (400, "bad_s3_url", "'..'"),
        f"s3://{BUCKET}/": (400, "bad_s3_url", "names no object"),
        "s3://No_Such/a.png": (400, "bad_s3_url", "bucket name"),
        f"s3://{BUCKET}/scope/missing.png": (404, "s3_not_found", "no object"),
        f"s3://{BUCKET}/scope/big.png": (413, "image_too_large", "over 1000"),
    }
    for url, (status, code, words) in cases.items():
        error = refused(url, settings)
        assert (error.status, error.code) == (status, code), url
        assert words in error.message, error.message
    assert read(f"s3://{SCOPED}/team-a/ok.png", settings) == b"ok"

    error = refused(f"s3://{BUCKET}/a.png", make_settings(tmp_path))
    assert (error.status, error.code) == (403, "s3_not_configured")
    missing_bucket = make_settings(tmp_path, storage_profiles={"b2": moto.profile(["no-such-bucket"])})
    error = refused("s3://no-such-bucket/a.png", missing_bucket)
    assert (error.status, error.code) == (404, "s3_not_found") and "bucket" in error.message

    # Wrong credentials: the message names the profile and never the secret.
    wrong = make_settings(
        tmp_path, storage_profiles={"b2": moto.profile([BUCKET], secret_access_key="W" * 40)}
    )
    error = refused(f"s3://{BUCKET}/scope/a.png", wrong)
    assert (error.status, error.code) == (403, "s3_credentials")
    assert (
        "'b2'" in error.message and "W" * 40 not in error.message and moto.admin.secret not in error.message
    )
    assert "W" * 40 not in repr(wrong) and "W" * 40 not in wrong.model_dump_json()

    # A key that may read but not write: a job's output is refused at submit time, not after the work.
    readonly = make_settings(tmp_path, storage_profiles={"ro": moto.profile([BUCKET], key=moto.reader)})
    assert read(f"s3://{BUCKET}/scope/a.png", readonly) == b"a"
    with pytest.raises(ApiError) as caught:
        store_for(readonly).check_writable(f"s3://{BUCKET}/out")
    assert (caught.value.status, caught.value.code) == (
        403,
        "s3_forbidden",
    ) and "'ro'" in caught.value.message

    # The secret from a file (a Docker or Kubernetes secret); an unreadable one is the operator's to fix.
    (tmp_path / "secret").write_text(moto.admin.secret + "\n")
    from_file = moto.profile([BUCKET], secret_access_key=None, secret_file=str(tmp_path / "secret"))
    assert (
        read(f"s3://{BUCKET}/scope/a.png", make_settings(tmp_path, storage_profiles={"f": from_file})) == b"a"
    )
    gone = moto.profile([BUCKET], secret_access_key=None, secret_file=str(tmp_path / "nothing"))
    error = refused(f"s3://{BUCKET}/scope/a.png", make_settings(tmp_path, storage_profiles={"f": gone}))
    assert (error.status, error.code) == (503, "s3_misconfigured")

    # Listing: outside the prefix, and a missing bucket.
    with pytest.raises(ApiError, match="outside the prefix"):
        list(store_for(settings).list_keys(f"s3://{SCOPED}/", (".png",)))
    with pytest.raises(ApiError, match="does not exist"):
        list(store_for(missing_bucket).list_keys("s3://no-such-bucket/x", (".png",)))


def test_settings_from_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ENDPOINT_URL": "https://s3.eu-central-003.backblazeb2.com",
        "REGION": "eu-central-003",
        "ACCESS_KEY_ID": "0031234567890ab0000000001",
        "SECRET_ACCESS_KEY": "K003-not-a-real-secret",
        "BUCKETS": '["frames"]',
    }.items():
        monkeypatch.setenv(f"LABELSERVE_STORAGE_PROFILES__B2__{name}", value)
    monkeypatch.setenv("LABELSERVE_URL_ALLOW_HOSTS", "minio.internal, 10.1.0.0/16")
    settings = Settings()
    profile = settings.storage_profiles["b2"]
    assert (profile.region, profile.buckets, profile.secret()) == (
        "eu-central-003",
        ("frames",),
        "K003-not-a-real-secret",
    )
    assert "K003-not-a-real-secret" not in repr(settings) + settings.model_dump_json()
    assert settings.url_allow_hosts == ["minio.internal", "10.1.0.0/16"]

    base = {"endpoint_url": "http://x", "region": "r", "access_key_id": "k", "secret_access_key": "s"}
    with pytest.raises(ValidationError, match="is in profiles"):
        Settings(storage_profiles={"a": {**base, "buckets": ["f"]}, "b": {**base, "buckets": ["f"]}})
    with pytest.raises(ValidationError, match="exactly one of"):
        Settings(storage_profiles={"a": {**base, "buckets": ["f"], "secret_file": "/run/secrets/b2"}})


# -- faults: throttling and silence ----------------------------------------------------------------------


@pytest.fixture
def faulty() -> Iterator[FaultyS3]:
    server = FaultyS3(b"the image")
    yield server
    server.close()


def fault_settings(faulty: FaultyS3, tmp: Path, **overrides: object) -> Settings:
    profile = {
        "endpoint_url": faulty.endpoint,
        "region": REGION,
        "access_key_id": "key",
        "secret_access_key": "secret",
        "buckets": [BUCKET],
    }
    return make_settings(tmp, storage_profiles={"b2": profile}, **overrides)


def test_slowdown_is_retried_after_retry_after_within_each_budget(faulty: FaultyS3, tmp_path: Path) -> None:
    settings = fault_settings(faulty, tmp_path, s3_interactive_attempts=2, s3_job_attempts=3)
    url = f"s3://{BUCKET}/a.png"

    faulty.reset(throttle=2)  # a click: its small budget runs out, and the caller learns when to retry
    error = refused(url, settings)
    assert (error.status, error.code, error.headers) == (503, "s3_throttled", {"Retry-After": "1"})
    assert "2 attempts" in error.message and len(faulty.arrivals) == 2

    faulty.reset(throttle=2)  # a job: the larger budget rides it out, waiting as long as B2 asked
    assert read(url, settings, "job") == b"the image"
    gaps = [b - a for a, b in zip(faulty.arrivals, faulty.arrivals[1:], strict=False)]
    assert len(faulty.arrivals) == 3 and all(0.99 <= gap < 4 for gap in gaps), gaps


def test_an_unanswered_request_times_out_within_its_budget(faulty: FaultyS3, tmp_path: Path) -> None:
    settings = fault_settings(faulty, tmp_path, s3_timeout_s=0.5, s3_interactive_attempts=2)
    faulty.reset(hang=True)
    start = time.monotonic()
    error = refused(f"s3://{BUCKET}/a.png", settings)
    assert (error.status, error.code) == (504, "s3_timeout") and "'b2'" in error.message
    assert len(faulty.arrivals) == 2 and time.monotonic() - start < 4


# -- http(s) URLs: private hosts by allow-list -----------------------------------------------------------


@contextlib.contextmanager
def image_server() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server answering b"bytes" to every GET: its port, and the paths it was asked for."""
    hits: list[str] = []

    class Image(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"bytes")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Image)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port, hits
    finally:
        server.shutdown()


def test_private_http_hosts_only_when_allow_listed(tmp_path: Path) -> None:
    def fetch(url: str, **overrides: object) -> bytes:
        return asyncio.run(READERS["http"](url, make_settings(tmp_path, **overrides)))

    with image_server() as (port, _):
        assert fetch(f"http://127.0.0.1:{port}/a.png", url_allow_hosts=["127.0.0.0/8"]) == b"bytes"
        assert fetch(f"http://localhost:{port}/a.png", url_allow_hosts=["LocalHost"]) == b"bytes"
        for allowed in ([], ["10.0.0.0/8"], ["example.com"]):
            with pytest.raises(ApiError) as caught:
                fetch(f"http://127.0.0.1:{port}/a.png", url_allow_hosts=allowed)
            assert caught.value.code == "url_forbidden" and "URL_ALLOW_HOSTS" in caught.value.message


def test_a_host_that_resolves_differently_the_second_time_cannot_reach_a_private_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the first answer (checked) is public, later ones point at the loopback server. The
    request must go to the checked address, never to that server. To stay on loopback, 127.0.0.2 plays the
    public address: nothing listens there."""
    real = asyncio.base_events.BaseEventLoop.getaddrinfo
    answers = iter(["127.0.0.2"])
    is_public = sources._is_public
    monkeypatch.setattr(sources, "_is_public", lambda address: address == "127.0.0.2" or is_public(address))

    async def rebinding(self, host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if host not in ("rebind.test", b"rebind.test"):  # anyio asks with the IDNA bytes
            return await real(self, host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), port))]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", rebinding)
    with image_server() as (port, hits):
        with pytest.raises(ApiError) as caught:
            asyncio.run(
                READERS["http"](f"http://rebind.test:{port}/a.png", make_settings(tmp_path, url_timeout_s=1))
            )
        assert caught.value.code in ("url_unreachable", "url_timeout")
        assert hits == []  # the loopback server was never reached


# -- CVAT manifests --------------------------------------------------------------------------------------


def manifest_text(names: list[str]) -> str:
    lines = ['{"version":"1.1"}', '{"type":"images"}']
    lines += [
        json.dumps(
            {
                "name": n.rsplit(".", 1)[0],
                "extension": "." + n.rsplit(".", 1)[1],
                "width": 1,
                "height": 1,
                "meta": {"related_images": []},
            }
        )
        for n in names
    ]
    return "\n".join(lines) + "\n"


def test_manifest_is_read_as_cvat_does(tmp_path: Path) -> None:
    text = manifest_text(["a.jpg", "sub/dir/b.png"])
    assert list(manifest_names(text.splitlines(), "m")) == ["a.jpg", "sub/dir/b.png"]
    assert list(manifest_names(['{"version":"1.0"}', '{"type":"images"}', ""], "m")) == []
    problems = {
        "not a CVAT manifest": ['{"version":"1.1"}'],
        "video manifest": ['{"version":"1.1"}', '{"type":"video"}'],
        "Line 1 ": ['{"version":"3"}', '{"type":"images"}'],
        "Line 3 ": ['{"version":"1.1"}', '{"type":"images"}', '{"extension":".jpg"}'],
        "Line 2 ": ['{"version":"1.1"}', "not json"],
    }
    for words, lines in problems.items():
        with pytest.raises(ApiError, match=words) as caught:
            list(manifest_names(lines, "m"))
        assert (caught.value.status, caught.value.code) == (400, "bad_manifest")

    # Local manifests: keys relative to the manifest's folder, names that would leave the output refused.
    (tmp_path / "m.jsonl").write_text(text)
    source = {"manifest": str(tmp_path / "m.jsonl"), "frames": {"start": 1}}
    entries = JobSpec.model_validate(job_body(source, "s3://x/y")).source.enumerate(Settings())
    assert entries == [(str(tmp_path / "sub/dir/b.png"), "sub/dir/b.png")]
    (tmp_path / "bad.jsonl").write_text(manifest_text(["../up.jpg"]))
    with pytest.raises(ApiError, match="outside the output directory"):
        JobSpec.model_validate(job_body({"manifest": str(tmp_path / "bad.jsonl")}, "o")).source.enumerate(
            Settings()
        )


# -- jobs ------------------------------------------------------------------------------------------------


def job_body(source: dict, out: str, fmt: str = "cvat_images", detector: str = "rects") -> dict:
    return {"source": source, "detector": detector, "output": {"format": fmt, "directory": out}}


def upload_tree(moto: MotoS3, directory: Path, prefix: str) -> None:
    s3 = moto.client()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            s3.put_object(
                Bucket=BUCKET, Key=prefix + path.relative_to(directory).as_posix(), Body=path.read_bytes()
            )


def download_tree(moto: MotoS3, prefix: str) -> dict[str, bytes]:
    s3 = moto.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
    return {k[len(prefix) :]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def engine_for(tmp_path: Path) -> Iterator[Callable[..., LocalEngine]]:
    engines: list[LocalEngine] = []

    def make(settings: Settings, detector: RectDetector | None = None) -> LocalEngine:
        found = detector or RectDetector()
        engine = LocalEngine(
            lambda _: found, state_db=tmp_path / "jobs.sqlite3", settings=settings, readers=2
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_job_over_an_s3_prefix_writes_the_same_files_to_s3_as_locally(
    moto: MotoS3, contract: HeaderContract, tmp_path: Path, engine_for: Callable[..., LocalEngine]
) -> None:
    write_dataset(tmp_path / "images", 10)  # 10 PNGs, some in sub/, and a notes.txt that is not listed
    upload_tree(moto, tmp_path / "images", "jobs/scenes/")
    settings = s3_settings(moto, tmp_path, contract)
    engine = engine_for(settings)

    local = wait_for(
        engine,
        engine.submit(
            JobSpec.model_validate(
                job_body({"directory": str(tmp_path / "images")}, str(tmp_path / "local"), "yolo")
            )
        ).id,
    )
    remote = wait_for(
        engine,
        engine.submit(
            JobSpec.model_validate(
                job_body({"directory": f"s3://{BUCKET}/jobs/scenes"}, f"s3://{BUCKET}/jobs/out", "yolo")
            )
        ).id,
    )

    assert (local.state, local.done, remote.state, remote.done) == ("completed", 10, "completed", 10)
    assert remote.outputs == [f"s3://{BUCKET}/jobs/out/data.yaml", f"s3://{BUCKET}/jobs/out/labels"]
    written = {
        p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
        for p in (tmp_path / "local").rglob("*")
        if p.is_file()
    }
    uploaded = download_tree(moto, "jobs/out/")
    assert uploaded.pop(".labelserve-write-check") == b""
    assert uploaded == written and len(written) == 11
    assert not any((settings.data_dir / STAGING_DIR).iterdir())  # the staging folder is cleaned up


def test_job_over_an_s3_manifest_with_a_frame_range(
    moto: MotoS3, contract: HeaderContract, tmp_path: Path, engine_for: Callable[..., LocalEngine]
) -> None:
    truth = write_dataset(tmp_path / "images", 8)
    upload_tree(moto, tmp_path / "images", "cvat/share/")
    names = sorted(truth)
    put(moto, "cvat/share/manifest.jsonl", manifest_text(names).encode())
    engine = engine_for(s3_settings(moto, tmp_path, contract))
    source = {
        "manifest": f"s3://{BUCKET}/cvat/share/manifest.jsonl",
        "frames": {"start": 1, "stop": 6, "step": 2},
    }
    status = wait_for(
        engine, engine.submit(JobSpec.model_validate(job_body(source, f"s3://{BUCKET}/cvat/out"))).id
    )
    assert (status.state, status.done, status.failed) == ("completed", 3, 0)
    root = ET.fromstring(download_tree(moto, "cvat/out/")["annotations.xml"])
    assert [image.attrib["name"] for image in root.iter("image")] == [names[1], names[3], names[5]]


def test_a_failed_upload_fails_the_job_and_resuming_uploads(
    moto: MotoS3, contract: HeaderContract, tmp_path: Path, engine_for: Callable[..., LocalEngine]
) -> None:
    write_dataset(tmp_path / "images", 8)
    upload_tree(moto, tmp_path / "images", "resume/scenes/")
    actions = ["s3:GetObject", "s3:ListBucket", "s3:PutObject"]
    key = moto.new_user("uploader", actions)
    settings = make_settings(
        tmp_path, storage_profiles={"up": moto.profile([BUCKET], key=key)}, data_dir=tmp_path
    )
    contract.watch(settings)
    engine = engine_for(settings, RectDetector(delay=0.1))
    body = job_body({"directory": f"s3://{BUCKET}/resume/scenes/"}, f"s3://{BUCKET}/resume/out/", "coco")
    job_id = engine.submit(JobSpec.model_validate(body | {"batch_size": 2})).id  # checks writing: allowed
    moto.allow("uploader", actions[:2])  # then, while the job runs, the key loses its write permission

    failed = wait_for(engine, job_id)
    assert failed.state == "failed" and failed.done == 8
    assert "uploading the output failed" in failed.error and "'up' may not access" in failed.error
    moto.allow("uploader", actions)
    engine.resume(job_id)
    done = wait_for(engine, job_id)
    assert done.state == "completed" and done.outputs == [f"s3://{BUCKET}/resume/out/annotations.json"]
    assert len(json.loads(download_tree(moto, "resume/out/")["annotations.json"])["images"]) == 8


def test_prelabel_command_from_and_to_s3(
    moto: MotoS3,
    contract: HeaderContract,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    truth = write_dataset(tmp_path / "images", 4)
    upload_tree(moto, tmp_path / "images", "cli/in/")
    put(moto, "cli/in/manifest.jsonl", manifest_text(sorted(truth)).encode())
    monkeypatch.setenv("LABELSERVE_STORAGE_PROFILES", json.dumps({"b2": moto.profile([BUCKET])}))
    monkeypatch.setenv("LABELSERVE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    contract.watch(get_settings())  # the settings the command reads
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(
        parser.add_subparsers(), lambda model, sam_refine: (lambda _: RectDetector(), None)
    )

    def run(*argv: str) -> int:
        args = parser.parse_args(["prelabel", *argv, "--model", "rects", "--format", "coco", "--no-progress"])
        return args.func(args)

    try:
        manifest = cli.build_spec(
            parser.parse_args(
                [
                    "prelabel",
                    f"s3://{BUCKET}/cli/in/manifest.jsonl",
                    "--model",
                    "m",
                    "--out",
                    "o",
                    "--format",
                    "coco",
                ]
            )
        )
        assert manifest.source.manifest == f"s3://{BUCKET}/cli/in/manifest.jsonl"
        assert run(f"s3://{BUCKET}/cli/in", "--out", f"s3://{BUCKET}/cli/out") == 0
        assert capsys.readouterr().out.split() == [f"s3://{BUCKET}/cli/out/annotations.json"]
        assert (tmp_path / "data" / cli.STATE_DB_NAME).is_file()
    finally:
        get_settings.cache_clear()
    coco = json.loads(download_tree(moto, "cli/out/")["annotations.json"])
    assert sorted(image["file_name"] for image in coco["images"]) == sorted(truth)


# -- the HTTP API end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(moto: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Settings]]:
    """MobileSAM (seeded random weights) and the real fall/person detector, reading from moto."""
    tmp = tmp_path_factory.mktemp("s3api")
    settings = s3_settings(moto, tmp, detector_paths={"fall": str(fall_checkpoint())})
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        yield client, settings


def test_sam_reads_s3_and_the_same_bytes_under_two_keys_share_one_embedding(
    api: tuple[TestClient, Settings], moto: MotoS3, contract: HeaderContract
) -> None:
    client, settings = api
    contract.watch(settings)
    image = encode_image(synthetic_scene(320, 240, seed=7))
    put(moto, "sam/a.png", image)
    put(moto, "sam/copy-of-a.png", image)
    first = client.post("/v1/sam/mobile_sam/embed", json={"image": {"url": f"s3://{BUCKET}/sam/a.png"}})
    hits = client.get("/v1/cache/stats").json()["embeddings"]["hits"]
    second = client.post(
        "/v1/sam/mobile_sam/embed", json={"image": {"url": f"s3://{BUCKET}/sam/copy-of-a.png"}}
    )
    assert first.status_code == second.status_code == 200
    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    assert first.json()["image_id"] == second.json()["image_id"]
    assert client.get("/v1/cache/stats").json()["embeddings"]["hits"] == hits + 1

    click = {"image": {"url": f"s3://{BUCKET}/sam/a.png"}, "points": [[96, 120]]}
    segment = client.post("/v1/sam/mobile_sam/segment", json=click)
    assert segment.status_code == 200 and segment.json()["masks"]

    for url, status, code in [
        (f"s3://{BUCKET}/sam/missing.png", 404, "s3_not_found"),
        ("s3://not-allowed/a.png", 403, "s3_bucket_forbidden"),
    ]:
        response = client.post("/v1/sam/mobile_sam/embed", json={"image": {"url": url}})
        assert response.status_code == status and response.json()["error"]["code"] == code


def test_detection_from_s3_equals_detection_of_the_same_bytes_inline(
    api: tuple[TestClient, Settings], moto: MotoS3, contract: HeaderContract, bus_jpg: bytes
) -> None:
    client, settings = api
    contract.watch(settings)
    put(moto, "detect/bus.jpg", bus_jpg)
    by_url = client.post("/v1/detect/fall", json={"image": {"url": f"s3://{BUCKET}/detect/bus.jpg"}})
    files = {"file": ("bus.jpg", io.BytesIO(bus_jpg), "image/jpeg")}
    inline = client.post("/v1/detect/fall", files=files, data={"params": "{}"})
    assert by_url.status_code == inline.status_code == 200
    assert by_url.json()["shapes"] and by_url.json()["shapes"] == inline.json()["shapes"]


def test_job_route_from_an_s3_prefix_to_an_s3_output(
    api: tuple[TestClient, Settings], moto: MotoS3, contract: HeaderContract, bus_jpg: bytes
) -> None:
    client, settings = api
    contract.watch(settings)
    for name in ("one.jpg", "two.jpg"):
        put(moto, f"route/in/{name}", bus_jpg)
    body = job_body({"directory": f"s3://{BUCKET}/route/in"}, f"s3://{BUCKET}/route/out", "coco", "fall")
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 201, submitted.text
    deadline = time.monotonic() + 60
    while (status := client.get(f"/v1/jobs/{submitted.json()['id']}").json())["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["state"] == "completed" and status["outputs"] == [
        f"s3://{BUCKET}/route/out/annotations.json"
    ]
    coco = json.loads(download_tree(moto, "route/out/")["annotations.json"])
    assert [i["file_name"] for i in coco["images"]] == ["one.jpg", "two.jpg"] and coco["annotations"]

    refused_body = job_body({"directory": "s3://not-allowed/x"}, f"s3://{BUCKET}/route/o2", "coco", "fall")
    response = client.post("/v1/jobs", json=refused_body)
    assert response.status_code == 403 and response.json()["error"]["code"] == "s3_bucket_forbidden"


def test_browsing_lists_one_bounded_page_at_a_time_within_the_allow_list(
    api: tuple[TestClient, Settings], moto: MotoS3, contract: HeaderContract
) -> None:
    """GET /v1/storage[/list|/object], as the web console's bucket browser uses them."""
    client, settings = api
    contract.watch(settings)
    names = [f"browse/img-{i:02d}.jpg" for i in range(5)]
    for name in [*names, "browse/sub/deeper.png", "browse/sub2/x.png"]:
        put(moto, name, name.encode())
    put(moto, "team-a/in-prefix.png", b"a", bucket=SCOPED)

    roots = client.get("/v1/storage").json()["roots"]
    assert {"profile": "team", "url": f"s3://{SCOPED}/team-a/"} in roots
    assert {"profile": "b2", "url": f"s3://{BUCKET}/"} in roots

    listed, cursor, folders, pages = [], None, [], 0
    while True:
        query = {"url": f"s3://{BUCKET}/browse/", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/storage/list", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["folders"]) + len(body["objects"]) <= 3
        folders += body["folders"]
        listed += [obj["name"] for obj in body["objects"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3  # 2 folders + 5 objects, 3 at a time
    assert folders == [f"s3://{BUCKET}/browse/sub/", f"s3://{BUCKET}/browse/sub2/"]
    assert listed == [name.removeprefix("browse/") for name in names]  # only what lies directly under it

    one = client.get("/v1/storage/object", params={"url": f"s3://{BUCKET}/{names[0]}"})
    assert one.status_code == 200 and one.content == names[0].encode()
    assert one.headers["content-type"] == "image/jpeg"

    for url, status, code in [
        ("s3://not-allowed/", 403, "s3_bucket_forbidden"),
        (f"s3://{SCOPED}/team-b/", 403, "s3_key_forbidden"),  # outside the profile's prefix
        (f"s3://{BUCKET}/a/../b/", 400, "bad_s3_url"),
        ("https://example.com/", 400, "bad_s3_url"),
    ]:
        response = client.get("/v1/storage/list", params={"url": url})
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), url
    assert client.get("/v1/storage/list", params={"url": f"s3://{BUCKET}/", "limit": 1001}).status_code == 422
