"""Byte-bounded, thread-safe LRU maps, shared by every cache: L1 embeddings, refinement logits, prefetch and
warm-up ids, and the object store's objects (hence here, below every layer that keeps one)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    inflight_waits: int = 0
    uncacheable: int = 0


class ByteLRU(Generic[V]):
    """LRU map whose total size (as reported by `size_of`) never exceeds `max_bytes`."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self.lock = threading.RLock()
        self.stats = CacheStats()

    def get(self, key: Hashable, count: bool = True) -> V | None:
        """`count=False`: a lookup left out of the hit and miss counts (background work, whose misses are
        expected and would hide the hit rate that requests see)."""
        with self.lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += count
                return None
            self._items.move_to_end(key)
            self.stats.hits += count
            return item[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store `value`; returns False when it alone is larger than the whole cache."""
        size = self._size_of(value)
        with self.lock:
            self._discard(key)
            if size > self.max_bytes:
                self.stats.uncacheable += 1
                return False
            while self._bytes + size > self.max_bytes and self._items:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self.stats.evictions += 1
            self._items[key] = (value, size)
            self._bytes += size
            return True

    def _discard(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    def discard(self, key: Hashable) -> None:
        with self.lock:
            self._discard(key)

    def discard_where(self, doomed: Callable[[Hashable], bool]) -> int:
        """Drops every entry whose key `doomed` accepts; returns how many."""
        with self.lock:
            keys = [key for key in self._items if doomed(key)]
            for key in keys:
                self._discard(key)
            return len(keys)

    def clear(self) -> int:
        with self.lock:
            count = len(self._items)
            self._items.clear()
            self._bytes = 0
            return count

    def __contains__(self, key: Hashable) -> bool:
        with self.lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                **vars(self.stats),
            }
