"""`labelserve serve` under uvicorn: the API port, and the CVAT listener's port when one is configured. Both
servers run in one event loop over the same app, so CVAT's calls share the models and caches."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

from server.api.middleware import CvatListener
from server.settings import Settings

log = logging.getLogger("labelserve")


class _Server(uvicorn.Server):
    """Signals are handled once for all servers: uvicorn's own handler would stop only one of them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def servers(app: FastAPI, settings: Settings) -> list[uvicorn.Server]:
    # log_config=None: the root handler (server.ops.logs) formats uvicorn's lines too. No access log: the
    # audit log has a line per request, with more in it.
    common = {
        "log_config": None,
        "access_log": False,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }
    found = [_Server(uvicorn.Config(app, host=settings.host, port=settings.port, **common))]
    if settings.cvat_port is not None:
        host = settings.cvat_host or settings.host
        # lifespan off: the API server's start-up already loads the models (once).
        config = uvicorn.Config(
            CvatListener(app), host=host, port=settings.cvat_port, lifespan="off", **common
        )
        found.append(_Server(config))
    return found


def console_url(host: str, port: int) -> str:
    """Where a browser on this host finds the web console: a wildcard address is reached on loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"http://{host}:{port}/"


async def announce_console(running: list[uvicorn.Server], url: str) -> None:
    """Prints the console's URL once every server listens (after the models started loading)."""
    while not all(server.started for server in running):
        if any(server.should_exit for server in running):
            return
        await asyncio.sleep(0.05)
    log.info("web console: %s  (API docs: %sdocs)", url, url)


async def serve_all(
    running: list[uvicorn.Server], console: str | None = None, drain: Callable[[], None] | None = None
) -> None:
    """Until SIGINT or SIGTERM; a second signal stops without waiting for open connections. `drain` runs on
    the first signal, before the servers wait for the requests in flight."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if drain is not None and not any(server.should_exit for server in running):
            drain()
        for server in running:
            server.force_exit = server.should_exit
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    announcing = asyncio.create_task(announce_console(running, console)) if console else None
    try:
        await asyncio.gather(*(server.serve() for server in running))
    finally:
        if announcing is not None:
            announcing.cancel()


def serve(app: FastAPI, settings: Settings) -> None:
    """Serves until a signal, then ends the process once the app has shut down."""
    drain = getattr(app.state, "drain", None)
    asyncio.run(serve_all(servers(app, settings), console_url(settings.host, settings.port), drain))
    # The app's shutdown has run: jobs are back in their ledger, caches and clients closed. What is left is
    # the interpreter's final garbage collection over torch's object graph: 2 s when idle, up to 12 s after a
    # busy minute (measured), during which the process answers nothing and an orchestrator waits or kills.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
