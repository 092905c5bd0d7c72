"""The byte-bounded LRU and single-flight encodes, without a model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.lru import ByteLRU
from server.services.embeddings.l1 import EmbeddingCache


def test_lru_never_exceeds_its_byte_cap_and_evicts_least_recent() -> None:
    lru: ByteLRU[bytes] = ByteLRU(100, len)
    for key in "abc":
        lru.put(key, b"x" * 30)
    assert lru.bytes == 90
    lru.get("a")  # now the most recent
    lru.put("d", b"x" * 30)
    assert "b" not in lru and {"a", "c", "d"} <= {k for k in "acd" if k in lru}
    assert lru.bytes == 90 and lru.stats.evictions == 1
    lru.put("e", b"x" * 70)
    assert lru.bytes <= 100 and "e" in lru


def test_value_larger_than_the_cache_is_not_stored() -> None:
    lru: ByteLRU[bytes] = ByteLRU(10, len)
    assert lru.put("big", b"x" * 11) is False
    assert len(lru) == 0 and lru.stats.uncacheable == 1


def test_replacing_a_key_keeps_byte_count_right() -> None:
    lru: ByteLRU[bytes] = ByteLRU(100, len)
    lru.put("a", b"x" * 50)
    lru.put("a", b"x" * 20)
    assert lru.bytes == 20 and len(lru) == 1


def test_concurrent_misses_on_one_key_compute_once() -> None:
    cache: EmbeddingCache[bytes] = EmbeddingCache(1000, len)
    calls = 0
    gate = threading.Event()

    def slow() -> bytes:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return b"embedding"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get_or_compute, "k", slow) for _ in range(8)]
        time.sleep(0.2)
        gate.set()
        results = [f.result(timeout=5) for f in futures]
    assert calls == 1
    assert all(value == b"embedding" for value, _ in results)
    assert sum(1 for _, cached in results if not cached) == 1
    assert cache.stats.inflight_waits == 7


def test_failed_compute_reaches_waiters_and_caches_nothing() -> None:
    cache: EmbeddingCache[bytes] = EmbeddingCache(1000, len)
    gate = threading.Event()

    def failing() -> bytes:
        gate.wait(5)
        raise RuntimeError("encoder exploded")

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(cache.get_or_compute, "k", failing) for _ in range(3)]
        time.sleep(0.2)
        gate.set()
        for future in futures:
            with pytest.raises(RuntimeError, match="exploded"):
                future.result(timeout=5)
    assert "k" not in cache
    value, cached = cache.get_or_compute("k", lambda: b"ok")
    assert value == b"ok" and not cached
