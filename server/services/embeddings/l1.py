"""L1, the in-process embedding cache: a byte-bounded LRU (server/lru.py) with single-flight encodes."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future

from server.lru import ByteLRU, V


class EmbeddingCache(ByteLRU[V]):
    """A ByteLRU whose misses are computed once: concurrent requests for a key being encoded wait for it."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        super().__init__(max_bytes, size_of)
        self._inflight: dict[Hashable, Future[V]] = {}

    def get_or_compute(self, key: Hashable, compute: Callable[[], V], count: bool = True) -> tuple[V, bool]:
        """Returns (value, was_cached). Exceptions from `compute` reach every waiter and nothing is cached."""
        with self.lock:
            value = self.get(key, count)
            if value is not None:
                return value, True
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
            else:
                self.stats.inflight_waits += 1
        if not owner:
            return future.result(), True
        try:
            value = compute()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            self.put(key, value)
            future.set_result(value)
            return value, False
        finally:
            with self.lock:
                self._inflight.pop(key, None)

    def snapshot(self) -> dict:
        with self.lock:
            return {**super().snapshot(), "inflight": len(self._inflight)}
