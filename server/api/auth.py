"""API keys and scopes: which key may call which endpoint.

Keys are random 256-bit tokens, stored only as their sha256. A fast unsalted hash is enough for keys of that
entropy: salts and slow hashes (scrypt, PBKDF2) defend low-entropy passwords against guessing, and nobody can
guess a 256-bit key; a slow hash would only add its cost to every click. Every stored hash is compared, in
constant time, on each request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Mapping

from pydantic import ValidationError

from server.api.route_index import RouteTemplate
from server.errors import ApiError
from server.settings import ApiKeyEntry, Scope, Settings

log = logging.getLogger("labelserve.auth")

KEY_PREFIX = "lsk_"
ALL_SCOPES: frozenset[Scope] = frozenset(("interactive", "jobs", "admin", "metrics"))
OPEN: frozenset[Scope] = frozenset()  # no key needed, even when keys are configured

# Every route, by method and path prefix (at a "/" boundary), and the scopes of which a key needs one. The
# most specific rule wins: the longest prefix, then a named method over "*". A route no rule matches is
# refused to every key (and tests/test_auth.py fails), so an endpoint added elsewhere cannot slip through.
ROUTE_SCOPES: tuple[tuple[str, str, frozenset[Scope]], ...] = (
    # The web console's page and its static files: no data in them; every call it makes is an API call with
    # the user's key. "/" matches only itself, never as a prefix.
    ("GET", "/", OPEN),
    ("GET", "/console", OPEN),
    ("GET", "/healthz", OPEN),
    ("GET", "/readyz", OPEN),
    ("*", "/v1/sam", frozenset({"interactive"})),
    ("*", "/v1/concepts", frozenset({"interactive"})),
    ("*", "/v1/detect", frozenset({"interactive"})),
    ("*", "/v1/track", frozenset({"interactive"})),
    ("GET", "/v1/trackers", frozenset({"interactive"})),
    ("POST", "/v1/video", frozenset({"interactive"})),  # frames of a short video, to track
    ("*", "/v1/prefetch", frozenset({"interactive"})),
    # CVAT's webhooks carry no key: the body's HMAC with the profile's webhook secret authenticates them.
    ("POST", "/v1/cvat/webhooks", OPEN),
    ("POST", "/v1/cvat/lookahead", frozenset({"interactive"})),
    ("GET", "/v1/models", frozenset({"interactive", "jobs"})),
    ("GET", "/v1/whoami", ALL_SCOPES),  # any valid key learns its own id and scopes
    ("GET", "/v1/storage", frozenset({"interactive", "jobs"})),  # browsing the storage profiles' buckets
    ("POST", "/v1/models", frozenset({"admin"})),  # load and unload
    ("GET", "/v1/cache/stats", frozenset({"interactive", "admin"})),
    ("DELETE", "/v1/cache", frozenset({"admin"})),
    ("*", "/v1/jobs", frozenset({"jobs"})),
    ("POST", "/v1/corrections", frozenset({"jobs"})),
    # CVAT's Nuclio routes: CVAT itself comes through the CVAT listener or LABELSERVE_CVAT_ALLOW_IPS.
    ("*", "/api", frozenset({"interactive"})),
    ("GET", "/metrics", frozenset({"metrics"})),
    ("GET", "/openapi.json", ALL_SCOPES),
    ("GET", "/docs", ALL_SCOPES),
    ("GET", "/redoc", ALL_SCOPES),
)


def route_scopes(method: str, path: str) -> frozenset[Scope] | None:
    """The scopes that grant `method` on the route template `path`; None when no rule maps it."""
    method = "GET" if method == "HEAD" else method
    best: tuple[int, bool] | None = None
    found = None
    for rule_method, prefix, scopes in ROUTE_SCOPES:
        if rule_method not in ("*", method):
            continue
        if path != prefix and (prefix == "/" or not path.startswith(prefix.rstrip("/") + "/")):
            continue
        rank = (len(prefix), rule_method != "*")
        if best is None or rank > best:
            best, found = rank, scopes
    return found


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


class KeysFileError(ValueError):
    pass


_MISSING = (-1, -1, -1)  # the stamp of a keys file that is not there


def parse_keys_file(text: str, origin: str) -> list[ApiKeyEntry]:
    """One JSON object per line, as in LABELSERVE_API_KEYS; blank lines and '#' comments are skipped."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entries.append(ApiKeyEntry.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else exc.msg
            raise KeysFileError(f"{origin} line {number}: not a key entry ({first})") from None
    return entries


class KeyRing:
    """The keys of the settings and of the keys file, which is read again whenever it changes. A file that
    disappears or becomes unreadable or invalid contributes no keys (refusing its keys is the safe failure:
    a revocation must not be lost to a typo), and the error is logged."""

    def __init__(self, settings: Settings) -> None:
        self._fixed = list(settings.api_keys)
        self.path = settings.api_keys_file
        self.enabled = bool(self._fixed) or self.path is not None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None  # of the file as last read
        self._from_file: list[ApiKeyEntry] = []
        if self.path is not None:
            self._from_file = self._load(self._read_stamp())  # a bad file at start-up stops the start

    def _read_stamp(self) -> tuple[int, int, int]:
        """What tells a changed file: an editor's atomic save is a new inode, an append a new size."""
        assert self.path is not None
        try:
            stat = os.stat(self.path)
        except OSError:
            return _MISSING
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _load(self, stamp: tuple[int, int, int]) -> list[ApiKeyEntry]:
        assert self.path is not None
        if stamp == _MISSING:
            raise KeysFileError(f"{self.path} does not exist")
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise KeysFileError(f"{self.path} cannot be read: {exc}") from None
        entries = parse_keys_file(text, str(self.path))
        taken = {entry.id for entry in self._fixed}
        ids = [entry.id for entry in entries]
        clashes = sorted({i for i in ids if i in taken or ids.count(i) > 1})
        if clashes:
            raise KeysFileError(f"{self.path}: key ids {clashes} are given more than once")
        self._stamp = stamp
        log.info("%d API keys read from %s", len(entries), self.path)
        return entries

    def keys(self) -> list[ApiKeyEntry]:
        if self.path is not None and self._read_stamp() != self._stamp:
            self._reload()
        return [*self._fixed, *self._from_file]

    def _reload(self) -> None:
        with self._lock:
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return  # another request reloaded it meanwhile
            try:
                self._from_file = self._load(stamp)
            except KeysFileError as exc:
                log.error("API keys file unusable, its keys are refused until it is fixed: %s", exc)
                self._from_file, self._stamp = [], stamp

    def find(self, key: str) -> ApiKeyEntry | None:
        candidate = hash_key(key)
        found = None
        for entry in self.keys():  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(entry.hash, candidate):
                found = entry
        return found


def _networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(entry, strict=False) for entry in entries]


def address_in(host: str | None, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False  # a Unix socket or a test client: no address to vouch for it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
    return any(address in network for network in networks)


def _unauthorized(code: str, message: str, error: str | None = None) -> ApiError:
    challenge = 'Bearer realm="labelserve"' + (f', error="{error}"' if error else "")
    return ApiError(401, code, message, {"WWW-Authenticate": challenge})


CVAT_ROUTES = ("/api/", "/healthz", "/readyz", "/v1/cvat/webhooks/")  # what the CVAT listener serves


class Gate:
    """Decides, before the route runs (and before its body is read), whether the caller may call it."""

    def __init__(self, settings: Settings, keyring: KeyRing) -> None:
        self.keyring = keyring
        self.cvat_networks = _networks(settings.cvat_allow_ips)

    def check(
        self, listener: str, method: str, template: str | None, headers: Mapping[str, str], client: str | None
    ) -> tuple[str, ApiError | None]:
        """Who calls, and why they may not (None: they may). Who: a key's id, "anonymous" (no key needed, or
        none sent), "invalid-key", or "cvat". `template` is the matched route's path; None when no route
        takes the request (the router then answers 404 or 405, to a valid key only)."""
        if listener == "cvat":
            return "cvat", self._cvat_refusal(template, client)
        if not self.keyring.enabled:
            return "anonymous", None
        needed = route_scopes(method, template) if template is not None else ALL_SCOPES
        if needed is not None and not needed:  # OPEN
            return "anonymous", None
        if template is not None and template.startswith("/api/") and address_in(client, self.cvat_networks):
            return "cvat", None
        key = presented_key(headers)
        if key is None:
            return "anonymous", _unauthorized(
                "missing_api_key",
                "This endpoint needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
            )
        entry = self.keyring.find(key)
        if entry is None:
            return "invalid-key", _unauthorized(
                "invalid_api_key", "The API key is not valid (unknown or revoked).", "invalid_token"
            )
        if needed is None:
            return entry.id, ApiError(
                403,
                "route_not_mapped",
                f"{method} {template} is not in labelserve's route-to-scope table (server/api/auth.py "
                "ROUTE_SCOPES), so no key may call it; this is a server bug to report.",
            )
        if not needed & set(entry.scopes):
            wanted = " or ".join(sorted(needed))
            return entry.id, ApiError(
                403,
                "insufficient_scope",
                f"Key {entry.id!r} has scopes {list(entry.scopes)}; {method} {template} needs {wanted}.",
                {"WWW-Authenticate": 'Bearer realm="labelserve", error="insufficient_scope"'},
            )
        return entry.id, None

    def _cvat_refusal(self, template: str | None, client: str | None) -> ApiError | None:
        """The CVAT listener takes no keys (CVAT sends none): it serves only the Nuclio routes (and health),
        and only to the allow-listed networks when any are given."""
        if self.cvat_networks and not address_in(client, self.cvat_networks):
            return ApiError(403, "address_not_allowed", f"{client} is not in LABELSERVE_CVAT_ALLOW_IPS.")
        if template is not None and not any(
            template == prefix or template.startswith(prefix) for prefix in CVAT_ROUTES
        ):
            return ApiError(
                404, "not_found", "The CVAT listener serves only CVAT's Nuclio routes (/api/functions...)."
            )
        return None


def unmapped_routes(routes: Iterable[RouteTemplate]) -> list[str]:
    """'METHOD path' of every route method that no ROUTE_SCOPES rule maps (a mount counts as GET)."""
    return [
        f"{method} {route.path}"
        for route in routes
        for method in sorted(route.methods or {"GET"})
        if route_scopes(method, route.path) is None
    ]
