"""Around every request, before routing: its id (X-Request-ID, echoed), who calls and whether they may (before
the body is read), and once answered, its metrics and audit line. A plain ASGI middleware, so it sees
streamed responses end and never buffers a body."""

from __future__ import annotations

import logging
import time

import anyio
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import Gate, KeyRing, unmapped_routes
from server.api.deps import Services
from server.api.errors import error_response
from server.api.metrics import LiveCollector
from server.api.metrics import router as metrics_router
from server.api.route_index import RouteIndex
from server.jobs.store import JobStore
from server.ops.audit import audit
from server.ops.metrics import UNMATCHED, Metrics
from server.ops.request_context import REQUEST_ID_HEADER, begin, end, request_id_from
from server.settings import Settings

log = logging.getLogger("labelserve")


LISTENER = "labelserve.listener"  # the scope key naming the listener a request came through


class CvatListener:
    """The app as the CVAT listener serves it: requests are marked, and the gate serves them the Nuclio
    routes without a key. One app behind both ports shares the models, caches and metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, LISTENER: "cvat"}, receive, send)


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, routes: RouteIndex, gate: Gate, metrics: Metrics) -> None:
        self.app = app
        self.routes = routes
        self.gate = gate
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        listener: str = scope.get(LISTENER, "api")
        headers = Headers(scope=scope)
        request_id = request_id_from(headers.get(REQUEST_ID_HEADER))
        context, token = begin(request_id)
        template, takes_method = self.routes.match(scope)
        method: str = scope["method"]
        client = scope["client"][0] if scope.get("client") else None
        status = 500  # unless a response starts: an exception before it is a 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        in_flight = self.metrics.in_flight.labels(listener)
        in_flight.inc()
        failed = False
        try:
            context.key_id, refusal = self.gate.check(
                listener, method, template if takes_method else None, headers, client
            )
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except BaseException:
            failed = True
            raise
        finally:
            in_flight.dec()
            seconds = time.perf_counter() - started
            self.metrics.observe(listener, template or UNMATCHED, method, status, seconds, context.timings)
            with anyio.CancelScope(shield=True):  # a disconnected client still gets its audit line
                if context.image_unhashed:
                    await run_in_threadpool(context.image_reference)
                audit(
                    context,
                    listener=listener,
                    client=client,
                    method=method,
                    route=template or UNMATCHED,
                    path=scope["path"],
                    status=status,
                    duration_ms=seconds * 1000.0,
                )
            if not failed:  # the app's 500 handler runs outside this middleware and still needs the context
                end(token)


def install_request_pipeline(app: FastAPI, settings: Settings, services: Services, jobs: JobStore) -> Metrics:
    """API keys, request ids, metrics (GET /metrics) and the audit log, for both listeners. Call it once all
    routers are included: routes no scope rule maps are logged. Returns the app's metrics."""
    metrics = Metrics()
    metrics.watch(LiveCollector(services, jobs))
    app.include_router(metrics_router)
    gate = Gate(settings, KeyRing(settings))
    app.state.keyring = gate.keyring  # GET /v1/whoami tells a key its scopes
    routes = RouteIndex(app.router.routes)
    app.add_middleware(RequestMiddleware, routes=routes, gate=gate, metrics=metrics)
    unmapped = unmapped_routes(routes.templates())
    if unmapped and gate.keyring.enabled:
        log.error(
            "routes without a scope in server/api/auth.py ROUTE_SCOPES, refused to every key: %s", unmapped
        )
    return metrics
