"""The interface of a second-level embedding cache (Redis, disk), and what every tier shares: blob
validation, counters, and a circuit breaker that keeps a failing backend off the request path."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from models.base import ImageEmbedding
from server.services.embeddings.l2.blob import CorruptBlob, ForeignBlob, decode_blob, encode_blob
from server.services.embeddings.l2.breaker import Breaker

log = logging.getLogger("labelserve.cache")

T = TypeVar("T")


class TierUnavailable(Exception):
    """The backend could not do what was explicitly asked of it (clearing)."""


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0  # entries that failed validation: counted as misses too, and deleted
    foreign: int = 0  # whole entries of another architecture under the key: counted as misses too, kept
    errors: int = 0  # backend calls that failed (timeouts, refused connections, I/O errors)
    skipped: int = 0  # calls not made because the breaker was open
    read_ms_total: float = 0.0


class L2Tier(ABC):
    """get/put never raise: a cache that fails answers "miss" and the caller encodes. Keys are
    `model:preprocessing:dtype:content-sha256`; each backend prefixes its namespace and blob version. Every
    entry carries the architecture that wrote it, and is read only by that architecture (blob.py)."""

    kind: str

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.counters = TierCounters()
        self._lock = threading.Lock()

    # -- what a backend implements ---------------------------------------------------------------------------
    @abstractmethod
    def _read(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _write(self, key: str, blob: bytes) -> bool:
        """False when the backend declined to store it (larger than the whole tier)."""

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _clear(self) -> int:
        """Delete this namespace's entries (only those); returns how many."""

    @abstractmethod
    def _describe(self) -> dict: ...

    # -- the interface -------------------------------------------------------------------------------------
    def get(self, key: str, architecture: str) -> ImageEmbedding | None:
        started = time.perf_counter()
        reached, blob = self._call(self._read, key)
        if not reached:
            return None
        if blob is None:
            self._count(misses=1)
            return None
        try:
            embedding = decode_blob(blob, architecture)
        except ForeignBlob as exc:
            # Not damage: another replica's model of this name is another architecture (a misconfiguration);
            # deleting the entry would only make the two overwrite each other's entries faster.
            log.warning("%s cache: entry %s not read (%s)", self.kind, key, exc)
            self._count(foreign=1, misses=1)
            return None
        except CorruptBlob as exc:
            log.warning("%s cache: corrupt entry %s deleted (%s)", self.kind, key, exc)
            self._count(corrupt=1, misses=1)
            self._call(self._delete, key)
            return None
        self._count(hits=1, read_ms_total=(time.perf_counter() - started) * 1000)
        return embedding

    def put(self, key: str, embedding: ImageEmbedding, architecture: str) -> bool:
        _, stored = self._call(self._write, key, encode_blob(embedding, architecture))
        if stored:
            self._count(writes=1)
        return bool(stored)

    def clear(self) -> int:
        try:
            cleared = self._clear()
        except Exception as exc:
            self._count(errors=1)
            raise TierUnavailable(f"the {self.kind} cache could not be cleared: {exc}") from exc
        self.breaker.succeeded()
        return cleared

    def stats(self) -> dict:
        with self._lock:
            counters = asdict(self.counters)
        total_ms = counters.pop("read_ms_total")
        counters["read_ms_avg"] = round(total_ms / counters["hits"], 3) if counters["hits"] else None
        return {"tier": "l2", "kind": self.kind, **self._describe(), **counters, **self.breaker.snapshot()}

    @abstractmethod
    def close(self) -> None:
        """Release connections or files; the tier is not used afterwards."""

    # -- shared plumbing -----------------------------------------------------------------------------------
    def _call(self, operation: Callable[..., T], *args: object) -> tuple[bool, T | None]:
        """(whether the backend answered, its answer)."""
        if not self.breaker.allow():
            self._count(skipped=1)
            return False, None
        try:
            result = operation(*args)
        except Exception as exc:  # whatever the backend raised, the request goes on without the cache
            self._count(errors=1)
            reopening = self.breaker.state == "half_open"
            self.breaker.failed()
            if not reopening:
                log.warning("%s cache failing, skipped for %.1f s: %s", self.kind, self.breaker.wait_s, exc)
            return False, None
        if self.breaker.state != "closed":
            log.info("%s cache answering again", self.kind)
        self.breaker.succeeded()
        return True, result

    def _count(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)
