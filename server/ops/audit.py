"""The audit log: one JSON line per request on the `labelserve.audit` logger. It says who (the key's id, never
the key), what (method, route, path, the image's URL without its query or the sha256 of inline bytes, never
the bytes) and the outcome (status, duration)."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from server.ops.request_context import RequestContext

audit_log = logging.getLogger("labelserve.audit")
audit_log.setLevel(logging.INFO)  # quieting the application's logs must not silence the audit log


def utc_timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds, as every JSON log line has it: 2026-01-31T12:00:00.123Z."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit(
    context: RequestContext,
    *,
    listener: str,
    client: str | None,
    method: str,
    route: str,
    path: str,
    status: int,
    duration_ms: float,
) -> None:
    """Call `context.image_reference()` off the event loop first when inline bytes are still unhashed."""
    entry = {
        "time": utc_timestamp(time.time()),
        "request_id": context.request_id,
        "key": context.key_id,
        "listener": listener,
        "client": client,
        "method": method,
        "route": route,
        "path": path,
        "image": context.image_reference(),
        "status": status,
        "duration_ms": round(duration_ms, 2),
    }
    # The JSON log formatter lays `audit` out as top-level fields; the text formatter prints the message.
    audit_log.info(json.dumps(entry, separators=(",", ":")), extra={"audit": entry})
