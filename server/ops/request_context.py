"""What the current request is, for code far from the route: its id (logs), its caller and image (audit log),
and its stage timings (metrics). Held in a ContextVar, which run_in_threadpool copies into worker threads."""

from __future__ import annotations

import hashlib
import re
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from server.ops.timing import Timings

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed in headers and logs: only short, printable, header-safe ids are taken.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")


@dataclass
class RequestContext:
    request_id: str
    key_id: str = "anonymous"
    image: str | None = None  # a URL without its query, or sha256:HEX of inline bytes; never the bytes
    timings: list[Timings] = field(default_factory=list)
    _inline: bytes | None = field(default=None, repr=False)

    @property
    def image_unhashed(self) -> bool:
        return self.image is None and self._inline is not None

    def image_reference(self) -> str | None:
        """The image's reference, hashing inline bytes that nothing else hashed (detection); call it off the
        event loop."""
        if self.image is None and self._inline is not None:
            self.image = "sha256:" + hashlib.sha256(self._inline).hexdigest()
        self._inline = None
        return self.image


_current: ContextVar[RequestContext | None] = ContextVar("labelserve_request", default=None)


def begin(request_id: str) -> tuple[RequestContext, Token[RequestContext | None]]:
    context = RequestContext(request_id)
    return context, _current.set(context)


def end(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


def current() -> RequestContext | None:
    return _current.get()


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is a sane one, else a fresh id."""
    if header and _CLIENT_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def redact_url(url: str) -> str:
    """The URL without user info, query and fragment: presigned URLs carry their signature in the query."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def note_image_url(url: str) -> None:
    note_image_reference(redact_url(url))


def note_image_reference(reference: str) -> None:
    """What the request works on, already free of secrets (a job's source, say)."""
    context = current()
    if context is not None and context.image is None:
        context.image = reference


def note_image_bytes(data: bytes) -> None:
    """Inline image bytes: the audit log names them by their sha256, computed once (see note_content_hash)."""
    context = current()
    if context is not None and context.image is None and context._inline is None:
        context._inline = data


def note_content_hash(data: bytes, hexdigest: str) -> None:
    """`data` was hashed anyway (the embedding cache key): spare the audit log a second hash."""
    context = current()
    if context is not None and context.image is None and context._inline is data:
        context.image, context._inline = "sha256:" + hexdigest, None


def note_timings(timings: Timings) -> None:
    context = current()
    if context is not None:
        context.timings.append(timings)
