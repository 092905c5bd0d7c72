"""One HTTP request carried across a process boundary and served by an ASGI app in process: what the
ingress replica sends to a worker replica, and how the worker runs it through labelserve's own app, so every
route, middleware and error reply behaves as under `labelserve serve`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

REPLICA_HEADER = "x-labelserve-replica"  # which worker replica served the request


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"


@dataclass
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


async def serve_forwarded(
    app: ASGIApp, request: ForwardedRequest, extra_headers: list[tuple[bytes, bytes]]
) -> AsyncIterator[ResponseHead | bytes]:
    """The response as it is produced: its head first, then each body chunk (an NDJSON stream stays a
    stream). `extra_headers` are added to the head."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": ("ray-serve", 0),
        "state": {},
    }
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    finished = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()  # the caller only "disconnects" once the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    complete = False
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseHead(message["status"], [*message.get("headers", []), *extra_headers])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    complete = True
                    break
    finally:
        finished.set()
        if not complete:
            task.cancel()  # the caller went away mid-stream: stop producing
        # After a complete response the app still finishes (the audit log, metrics) before the call ends.
        await asyncio.gather(task, return_exceptions=True)
