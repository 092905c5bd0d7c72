"""Real S3 endpoints for the tests and benchmarks: moto in server mode on loopback with IAM authentication on
(so a wrong secret fails SigV4, as on B2), buckets in a B2 region; a recorder of the headers B2 rejects; and a
loopback endpoint that throttles or hangs, which no S3 server does on demand."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from server.inputs.objectstore.clients import Purpose
from server.inputs.objectstore.store import store_for
from server.settings import Settings

REGION = "eu-central-003"  # a B2 region: outside us-east-1, buckets need a LocationConstraint
B2_UNSUPPORTED = ("x-amz-checksum", "x-amz-sdk-checksum", "x-amz-trailer")
PURPOSES: tuple[Purpose, ...] = ("interactive", "job")


@dataclass(frozen=True)
class Key:
    id: str
    secret: str


@dataclass
class MotoS3:
    endpoint: str
    admin: Key  # may do anything
    reader: Key  # may only read and list

    def client(self, key: Key | None = None) -> Any:
        """A test-side client (uploads, checks), configured as labelserve's are."""
        key = key or self.admin
        config = Config(
            region_name=REGION,
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key.id,
            aws_secret_access_key=key.secret,
            config=config,
        )

    def create_bucket(self, name: str, versioned: bool = False) -> None:
        s3 = self.client()
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        if versioned:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})

    def profile(self, buckets: list[str], key: Key | None = None, **extra: object) -> dict:
        key = key or self.admin
        return {
            "endpoint_url": self.endpoint,
            "region": REGION,
            "access_key_id": key.id,
            "secret_access_key": key.secret,
            "buckets": buckets,
            **extra,
        }

    def new_user(self, name: str, actions: list[str]) -> Key:
        iam = self._iam()
        iam.create_user(UserName=name)
        made = iam.create_access_key(UserName=name)["AccessKey"]
        self.allow(name, actions)
        return Key(made["AccessKeyId"], made["SecretAccessKey"])

    def allow(self, user: str, actions: list[str]) -> None:
        """Replace the IAM policy of `user` (takes effect on the next request)."""
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        self._iam().put_user_policy(UserName=user, PolicyName="access", PolicyDocument=json.dumps(policy))

    def _iam(self) -> Any:
        return boto3.session.Session().client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.admin.id,
            aws_secret_access_key=self.admin.secret,
        )


def _set_moto_auth(endpoint: str, first_unchecked_requests: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=first_unchecked_requests.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=10).read()


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 (and IAM) on 127.0.0.1 with users "admin" (s3:*) and "reader" (get and list only)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        # moto's backends are process-wide: users and buckets of an earlier moto_s3() in this process are
        # still there, so start from a clean state.
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10
        ).read()
        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        keys = {}
        for user in ("admin", "reader"):
            iam.create_user(UserName=user)
            made = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = Key(made["AccessKeyId"], made["SecretAccessKey"])
        moto = MotoS3(endpoint, keys["admin"], keys["reader"])
        # Policies before authentication is switched on, while unsigned setup requests still pass.
        moto.allow("admin", ["s3:*", "iam:*"])
        moto.allow("reader", ["s3:GetObject", "s3:ListBucket"])
        _set_moto_auth(endpoint, "0")  # from now on every request is authenticated and authorised
        yield moto
    finally:
        _set_moto_auth(endpoint, "inf")  # the process-wide default again
        server.stop()


@dataclass
class HeaderContract:
    """Records each operation labelserve's S3 clients send, and each one carrying a header B2 rejects
    (moto accepts them, so this is the only check)."""

    operations: set[str] = field(default_factory=set)
    violations: list[tuple[str, list[str]]] = field(default_factory=list)
    sent: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (operation, headers)
    _watched: set[int] = field(default_factory=set)

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-send.s3.*", self._check)

    def watch(self, settings: Settings) -> None:
        """Attach to every client labelserve will use with `settings` (they are made once per store)."""
        store = store_for(settings)
        for profile in settings.storage_profiles:
            for purpose in PURPOSES:
                client = store.client(profile, purpose)
                if id(client) not in self._watched:
                    self._watched.add(id(client))
                    self.attach(client)

    def _check(self, request: Any, event_name: str, **_: object) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self.operations.add(operation)
        self.sent.append((operation, dict(request.headers)))
        bad = sorted(h for h in request.headers if h.lower().startswith(B2_UNSUPPORTED))
        if bad:
            self.violations.append((operation, bad))


SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyS3:
    """A loopback endpoint answering GetObject: `503 SlowDown` with `Retry-After: 1` to the next `throttle`
    requests and then the object, or (with `hang`) nothing at all. Records when each request arrived."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.throttle = 0
        self.hang = False
        self.arrivals: list[float] = []
        self._release = threading.Event()
        fault = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                fault.arrivals.append(time.monotonic())
                if fault.hang:
                    fault._release.wait(10)
                    return
                throttled = fault.throttle > 0
                if throttled:
                    fault.throttle -= 1
                body = SLOW_DOWN if throttled else fault.body
                self.send_response(503 if throttled else 200)
                if throttled:
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Type", "application/xml")
                else:
                    self.send_header("ETag", '"fault-etag"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def reset(self, throttle: int = 0, hang: bool = False) -> None:
        self.throttle, self.hang, self.arrivals = throttle, hang, []

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
