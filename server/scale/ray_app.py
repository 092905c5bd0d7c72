"""labelserve on Ray Serve: an ingress replica that keys each request by its image, and worker replicas that
each run labelserve's own app (models, L1, refinement history) and share one L2 (Redis).

    client ─HTTP─► Serve proxy ─► Ingress (@serve.ingress; CPU) ── routing_key(request) ──►
        LabelWorker.options(session_id=key)  (ConsistentHashRouter: the key's replica, or when it is at
        max_ongoing_requests, its ring successor, which finds the embedding in L2)

`serve.yaml` deploys it with `import_path: server.scale.ray_app:build_app`; `labelserve serve --engine ray`
runs it on a local or existing Ray cluster. Every Ray API used here is checked against ray==2.60.0 (the
router and backpressure config are alpha/experimental there): see docs/scale-out.md.
"""

# No `from __future__ import annotations`: serve.ingress re-creates the route methods, and FastAPI must still
# see `Request` as a class, not as a string, to inject it.
import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from server.api.body import read_limited_body
from server.api.errors import error_response, install_error_handlers
from server.app import create_app
from server.errors import ApiError
from server.scale.asgi import REPLICA_HEADER, ForwardedRequest, ResponseHead, serve_forwarded
from server.scale.router import PIN
from server.scale.routing import created_names, pinned_names, routing_key
from server.settings import Settings

log = logging.getLogger("labelserve")

CONSISTENT_HASH_ROUTER = "server.scale.router:PinnedConsistentHashRouter"
MAX_PINS = 100_000  # tracking states and prefetch runs remembered by the ingress (a few dozen bytes each)
STREAMED_SUFFIXES = ("/propagate",)  # the routes whose reply is a stream (NDJSON); the rest is sent whole
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class LabelWorker:
    """One replica: labelserve's app with its models loaded, served request by request from the ingress."""

    async def __init__(self, overrides: dict[str, Any]) -> None:
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        settings = Settings(**overrides)
        # Each replica writes its own state (the job ledger has one writer); by rank, so a restarted replica
        # finds its predecessor's.
        settings = settings.model_copy(
            update={"data_dir": settings.data_dir / f"replica-{context.rank.rank}"}
        )
        if settings.ray_gpu_memory_fraction is not None:
            _cap_gpu_memory(settings.ray_gpu_memory_fraction)
        self.app = create_app(settings, load_models_in_background=False)
        self._lifespan = AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self._header = [(REPLICA_HEADER.encode(), self.replica.encode())]

    async def handle(self, request: ForwardedRequest) -> tuple[ResponseHead, bytes]:
        """The whole response in one reply: a Serve stream costs a round trip per chunk."""
        head, chunks = None, []
        async for item in serve_forwarded(self.app, request, self._header):
            if isinstance(item, ResponseHead):
                head = item
            else:
                chunks.append(item)
        assert head is not None
        return head, b"".join(chunks)

    async def stream(self, request: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """The response as the app produces it (an NDJSON propagate, frame by frame)."""
        async for item in serve_forwarded(self.app, request, self._header):
            yield item

    async def __del__(self) -> None:
        await self._lifespan.aclose()  # jobs back to queued, encoders closed: as at a uvicorn shutdown


def _cap_gpu_memory(fraction: float) -> None:
    """Fractional num_gpus only schedules; this is what keeps replicas sharing a GPU within their share."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except asyncio.CancelledError:
        stream.cancel()  # the client went away: the worker stops producing
        raise


# Above the class: serve.ingress serializes it as it is decorated, with the names defined by then.
ingress_api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # the workers' app serves those
install_error_handlers(ingress_api)


@serve.ingress(ingress_api)
class Ingress:
    """Keys each request by its image and hands it, whole, to the worker that owns the key."""

    def __init__(self, worker: DeploymentHandle, overrides: dict[str, Any]) -> None:
        self.settings = Settings(**overrides)
        self.worker = worker
        # Tracking state id or prefetch run -> the replica holding it. Per ingress replica: keep one ingress
        # replica (the default) for later requests to find their replica (docs/scale-out.md).
        self._pins: OrderedDict[str, str] = OrderedDict()

    @ingress_api.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = await read_limited_body(request, self.settings.max_request_bytes)
        scope = request.scope
        key = routing_key(request.method, scope["path"], request.headers.get("content-type", ""), body)
        forwarded = ForwardedRequest(
            method=request.method,
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=list(scope["headers"]),
            body=body,
            client=tuple(scope["client"]) if scope.get("client") else None,
            scheme=scope.get("scheme", "http"),
        )
        names = pinned_names(scope["path"], request.headers.get("content-type", ""), body)
        pinned = next((self._pins[name] for name in names if name in self._pins), None)
        session = PIN + pinned if pinned is not None else key
        handle = self.worker.options(session_id=session) if session is not None else self.worker
        streamed = scope["path"].endswith(STREAMED_SUFFIXES)
        try:
            if streamed:
                stream = handle.options(stream=True).stream.remote(forwarded)
                head = await stream.__anext__()
            else:
                head, body = await handle.handle.remote(forwarded)
        except BackPressureError:
            return self._busy(429, "worker_queue_full", "every worker replica's queue is full")
        except (DeploymentUnavailableError, RayActorError):
            # A replica died under the request: the client retries, and the ring sends it to a live one.
            return self._busy(503, "worker_unavailable", "no worker replica could take the request")
        assert isinstance(head, ResponseHead)
        if not streamed and head.status in (200, 202):
            self._learn_pins(request.method, scope["path"], head, body)
        response = (
            StreamingResponse(_chunks(stream), head.status) if streamed else Response(body, head.status)
        )
        response.raw_headers = head.headers
        return response

    def _learn_pins(self, method: str, path: str, head: ResponseHead, body: bytes) -> None:
        """Tracking states or a prefetch run a reply creates live in the replica that answered: later requests
        naming them are pinned to it."""
        headers = dict(head.headers)
        names = created_names(method, path, headers.get(b"content-type", b"").decode(), body)
        replica = headers.get(REPLICA_HEADER.encode(), b"").decode()
        for name in names if replica else ():
            self._pins[name] = replica
            self._pins.move_to_end(name)
        while len(self._pins) > MAX_PINS:
            self._pins.popitem(last=False)

    def _busy(self, status: int, code: str, what: str) -> Response:
        retry = self.settings.busy_retry_after_s
        return error_response(
            ApiError(
                status,
                code,
                f"labelserve is at capacity ({what}); retry after {retry:g} s.",
                headers={"Retry-After": str(max(math.ceil(retry), 1))},
            )
        )


def worker_options(settings: Settings) -> dict[str, Any]:
    """The LabelWorker deployment's options from the settings (serve.yaml may override each)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "max_queued_requests": settings.ray_max_queued_requests,
        "ray_actor_options": {
            "num_cpus": settings.ray_replica_num_cpus,
            "num_gpus": settings.ray_replica_num_gpus,
        },
        "request_router_config": RequestRouterConfig(
            request_router_class=CONSISTENT_HASH_ROUTER,
            request_router_kwargs={"num_fallback_replicas": settings.ray_fallback_replicas},
        ),
    }
    if settings.ray_min_replicas == settings.ray_max_replicas:
        options["num_replicas"] = settings.ray_min_replicas
    else:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=settings.ray_min_replicas,
            max_replicas=settings.ray_max_replicas,
            target_ongoing_requests=settings.ray_target_ongoing_requests,
        )
    return options


def ingress_options(settings: Settings) -> dict[str, Any]:
    retry = settings.busy_retry_after_s
    room = (
        2 * settings.ray_max_replicas * (settings.ray_max_ongoing_requests + settings.ray_max_queued_requests)
    )
    return {
        "ray_actor_options": {"num_cpus": 0.25},  # key and forward: light CPU work
        # Room for every worker's slots and queue, so a flood is refused by the workers' queue bound (our
        # JSON 429) before Serve's proxy refuses it with its own plain-text 429.
        "max_ongoing_requests": room,
        "max_queued_requests": room,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=retry),
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application serve.yaml names; `args` are settings (LABELSERVE_* names, lower case, no prefix) on
    top of the replicas' environment."""
    overrides = dict(args or {})
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:  # Settings ignores unknown names; a typo in serve.yaml must not pass silently
        raise ValueError(f"unknown labelserve settings in the application's args: {unknown}")
    settings = Settings(**overrides)
    worker = serve.deployment(LabelWorker).options(**worker_options(settings)).bind(overrides)
    ingress = serve.deployment(Ingress).options(**ingress_options(settings))
    return ingress.bind(worker, overrides)


APP_NAME = "labelserve"


def run(overrides: dict[str, Any]) -> None:
    """`labelserve serve --engine ray`: starts a local Ray instance (or joins LABELSERVE_RAY_ADDRESS), serves
    the app on LABELSERVE_HOST:PORT until SIGINT or SIGTERM, then shuts Serve down."""
    import os
    import signal
    import threading

    import ray

    from server.cli.serve import console_url

    settings = Settings(**overrides)
    # A remote cluster's replicas do not see this shell's environment: the LABELSERVE_* variables go along.
    env = {k: v for k, v in os.environ.items() if k.startswith("LABELSERVE_")}
    joined = settings.ray_address is not None
    ray.init(
        address=settings.ray_address,
        include_dashboard=False if not joined else None,
        runtime_env={"env_vars": env} if joined and env else None,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(overrides), name=APP_NAME, route_prefix="/")
        log.info("labelserve on Ray Serve: %s", console_url(settings.host, settings.port))
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if not joined:
            serve.shutdown()
        ray.shutdown()
