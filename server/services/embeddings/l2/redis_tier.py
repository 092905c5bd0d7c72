"""L2 in Redis: shared by every replica, and outlives a labelserve restart.

redis-py parses replies with hiredis (a pinned dependency) when it is installed: its pure-Python parser
took 9–20 ms to read a 2 MiB embedding on the project's loaded 2-core machine, hiredis 1.3–2 ms.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.services.embeddings.l2.blob import VERSION
from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.tier import L2Tier

_CLEAR_BATCH = 500


class RedisTier(L2Tier):
    kind = "redis"

    def __init__(self, url: str, *, namespace: str, ttl_s: int, timeout_s: float, breaker: Breaker) -> None:
        super().__init__(breaker)
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = f"{namespace}:emb{VERSION}:"
        # No retries inside the client: the breaker decides when to try again, and a retry would multiply
        # the timeout a click pays while Redis is down. Connecting waits no longer than a command.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def _read(self, key: str) -> bytes | None:
        # GETEX: the TTL counts from the last use, so images being labelled stay while old ones expire.
        return self.client.getex(self.prefix + key, ex=self.ttl_s)

    def _write(self, key: str, blob: bytes) -> bool:
        self.client.set(self.prefix + key, blob, ex=self.ttl_s)
        return True

    def _delete(self, key: str) -> None:
        self.client.delete(self.prefix + key)

    def _clear(self) -> int:
        # Only this namespace: the Redis may be shared with other applications, so never FLUSHDB.
        cleared, batch = 0, []
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=_CLEAR_BATCH):
            batch.append(key)
            if len(batch) >= _CLEAR_BATCH:
                cleared += self.client.unlink(*batch)
                batch = []
        if batch:
            cleared += self.client.unlink(*batch)
        return cleared

    def _describe(self) -> dict:
        return {"url": redact(self.url), "ttl_s": self.ttl_s, "prefix": self.prefix}

    def close(self) -> None:
        self.client.close()


def redact(url: str) -> str:
    """The URL without its password, for stats and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))
