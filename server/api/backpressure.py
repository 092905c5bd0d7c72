"""Backpressure: bounded work in flight, answered with 503 + Retry-After instead of growing queues, and
"latest wins" for clicks, so a fast clicker's stale clicks are dropped instead of computed.

Interactive requests (SAM, detection, tracking) and job/admin requests are limited separately, so a burst of
job submissions cannot take the slots annotators need, and the other way round. Health, readiness, metrics
and job status reads are never limited: they are how operators and load balancers see an overloaded server.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ApiError, busy, error_body

INTERACTIVE_PREFIXES = (
    "/v1/sam/",
    "/v1/concepts/",
    "/v1/detect/",
    "/v1/track",
    "/v1/prefetch",
    "/api/function_invocations",
)
UNLIMITED = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


class InflightLimiter:
    """At most `interactive` interactive and `other` other requests at once (counts shared with /metrics)."""

    def __init__(self, interactive: int, other: int, retry_after_s: float) -> None:
        self.limits = {"interactive": interactive, "other": other}
        self.inflight = {"interactive": 0, "other": 0}
        self.refused = {"interactive": 0, "other": 0}
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()

    @staticmethod
    def kind(scope: Scope) -> str | None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(UNLIMITED):
            return None
        if scope.get("method") == "GET" and path.startswith("/v1/jobs"):
            return None  # progress polling must keep working while the server is full
        return "interactive" if path.startswith(INTERACTIVE_PREFIXES) else "other"

    def admit(self, kind: str) -> bool:
        with self._lock:
            if self.inflight[kind] < self.limits[kind]:
                self.inflight[kind] += 1
                return True
            self.refused[kind] += 1
            return False

    def release(self, kind: str) -> None:
        with self._lock:
            self.inflight[kind] -= 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "inflight": dict(self.inflight),
                "limits": dict(self.limits),
                "refused": dict(self.refused),
            }


class InflightMiddleware:
    """Pure ASGI (no per-request task or body buffering): refuses a request at once when its kind is full."""

    def __init__(self, app: ASGIApp, limiter: InflightLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self.limiter.kind(scope)
        if kind is None:
            await self.app(scope, receive, send)
            return
        if not self.limiter.admit(kind):
            limit = self.limiter.limits[kind]
            await _refuse(send, busy(f"{limit} {kind} requests in progress", self.limiter.retry_after_s))
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(kind)


async def _refuse(send: Callable[[dict], Awaitable[None]], error: ApiError) -> None:
    body = orjson.dumps(error_body(error.code, error.message))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LatestWins:
    """Per (client, model, image): only the newest click is computed. A click still waiting for a worker
    when a newer one for the same image arrives is answered 409 `superseded` without running."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._latest: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._counter = 0
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self.superseded = 0

    def ticket(self, client: str, model: str, image_id: str) -> tuple[tuple[str, str, str], int]:
        key = (client, model, image_id)
        with self._lock:
            self._counter += 1
            self._latest[key] = self._counter
            self._latest.move_to_end(key)
            while len(self._latest) > self._max_keys:
                self._latest.popitem(last=False)
            return key, self._counter

    def check(self, key: tuple[str, str, str], number: int) -> None:
        """Raise 409 when a newer click for the same image has arrived since this one."""
        with self._lock:
            newest = self._latest.get(key, number)
            if newest != number:
                self.superseded += 1
                raise ApiError(
                    409,
                    "superseded",
                    "A newer click on this image from the same client arrived before this one was computed; "
                    "only the newest is answered.",
                )
