"""Where image bytes come from: inline base64, or a URL whose scheme picks a reader in READERS: http/https
(guarded against SSRF) and s3 (server.inputs.objectstore, through the operator's storage profiles)."""

from __future__ import annotations

import asyncio
import binascii
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import httpcore
import httpx
import pybase64
from pydantic import BaseModel, Field, model_validator

from server.errors import ApiError
from server.inputs.objectstore.clients import Purpose
from server.inputs.objectstore.store import read_s3
from server.ops.request_context import note_image_bytes, note_image_url
from server.settings import Settings


class ImageRef(BaseModel):
    """An image given inline (`base64`) or by reference (`url`). Exactly one of them."""

    base64: str | None = Field(
        default=None, description="Base64 of the file bytes (a data: URI prefix is fine)."
    )
    url: str | None = Field(
        default=None, description="http(s) URL of the image file, or s3://bucket/key in an allowed bucket."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.base64 is None) == (self.url is None):
            raise ValueError("give exactly one of 'base64' or 'url'")
        return self


class Reader(Protocol):
    """Reads the bytes at `url`; `purpose` picks the retry budget (a person waiting, or a batch job)."""

    def __call__(
        self, url: str, settings: Settings, purpose: Purpose = "interactive"
    ) -> Awaitable[bytes]: ...


READERS: dict[str, Reader] = {}


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        # pybase64 (SIMD): CVAT sends the whole frame as base64 on every click; stdlib takes ~10x longer.
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", "The image is not valid base64; encode the file's bytes.") from None
    note_image_bytes(data)
    return data


async def read_image_ref(ref: ImageRef, settings: Settings) -> bytes:
    if ref.base64 is not None:
        return decode_base64(ref.base64)
    assert ref.url is not None
    note_image_url(ref.url)
    scheme = urlsplit(ref.url).scheme.lower()
    reader = READERS.get(scheme)
    if reader is None:
        raise ApiError(
            400, "unsupported_url", f"URL scheme {scheme!r} is not supported; use one of {sorted(READERS)}."
        )
    return await reader(ref.url, settings)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


def _allowed_networks(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for entry in settings.url_allow_hosts:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name
    return networks


async def _checked_address(host: str, port: int, settings: Settings) -> str:
    """The address to connect to for `host`: resolved once, every answer public or allow-listed. An
    allow-listed host name is returned as is (the operator trusts its resolution)."""
    if host.lower() in (entry.lower() for entry in settings.url_allow_hosts):
        return host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ApiError(
            400, "url_unreachable", f"The host {host!r} of the image URL does not resolve."
        ) from None
    allowed = _allowed_networks(settings)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    blocked = sorted(
        address
        for address in addresses
        if not _is_public(address) and not any(ipaddress.ip_address(address) in net for net in allowed)
    )
    if blocked:
        raise ApiError(
            403,
            "url_forbidden",
            f"The image URL resolves to a private or loopback address ({', '.join(blocked)}); such URLs are "
            "refused unless the operator lists the host or its network in LABELSERVE_URL_ALLOW_HOSTS (or "
            "sets LABELSERVE_URL_ALLOW_PRIVATE=true).",
        )
    return addresses[0]


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the very address that was checked. Checking a name and then letting the HTTP client
    resolve it again would let a DNS server answer differently the second time (DNS rebinding) and send the
    request to a private address. TLS still verifies the certificate against the URL's host name."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await _checked_address(host, port, self._settings)
        return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image URLs do not reach unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle takes ~35 ms, which every URL fetch would otherwise pay."""
    return httpx.create_ssl_context()


def _http_client(settings: Settings) -> httpx.AsyncClient:
    # No proxies from the environment: a proxy would resolve the host itself, past the check.
    transport = httpx.AsyncHTTPTransport(verify=_ssl_context(), trust_env=False)
    if not settings.url_allow_private:
        # httpx takes no network backend, so its connection pool is replaced by one with the checked backend.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(), network_backend=_CheckedBackend(settings)
        )
    return httpx.AsyncClient(
        transport=transport, timeout=settings.url_timeout_s, follow_redirects=False, trust_env=False
    )


async def read_http(url: str, settings: Settings, purpose: Purpose = "interactive") -> bytes:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ApiError(400, "bad_url", f"The image URL {url!r} has no host.")
    limit = settings.max_request_bytes
    try:
        async with _http_client(settings) as client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ApiError(
                    400, "url_status", f"The image URL answered HTTP {response.status_code}; check the URL."
                )
            chunks, total = [], 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > limit:
                    raise ApiError(
                        413, "image_too_large", f"The image at the URL is larger than {limit} bytes."
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise ApiError(
            400, "url_timeout", f"The image URL did not answer within {settings.url_timeout_s} s."
        ) from None
    except httpx.HTTPError as exc:
        raise ApiError(400, "url_unreachable", f"The image URL could not be fetched: {exc}.") from None


READERS["http"] = read_http
READERS["https"] = read_http
READERS["s3"] = read_s3


def read(ref: str, settings: Settings, purpose: Purpose = "job") -> bytes:
    """The bytes at a job's image reference, read on the caller's thread: a local path or file:// URL, or a
    URL whose scheme a READERS entry reads (the batch-job retry budget by default)."""
    scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
    if scheme in ("", "file"):
        return Path(unquote(urlsplit(ref).path) if scheme else ref).read_bytes()
    reader = READERS.get(scheme)
    if reader is None:
        raise ApiError(400, "unsupported_url", f"URL scheme {scheme!r} is not supported.")
    return asyncio.run(reader(ref, settings, purpose=purpose))
