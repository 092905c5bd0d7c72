"""The L2 tiers on their own, against a real redis-server and a real directory: blob format, validation,
the circuit breaker, the disk tier's byte cap across processes and restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from pydantic import ValidationError

from models.base import ImageEmbedding
from server.services.embeddings.l2 import build_l2
from server.services.embeddings.l2.blob import HEADER_SIZE, CorruptBlob, decode_blob, encode_blob
from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.disk_tier import DiskTier
from server.services.embeddings.l2.redis_tier import RedisTier, redact
from server.settings import Settings

from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]


def embedding(
    seed: int = 0, shape: tuple[int, ...] = (1, 256, 64, 64), dtype=torch.float16
) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    features = (torch.randn(shape, generator=generator) * 0.3).to(dtype)
    return ImageEmbedding(features, original_size=(1080, 810), input_size=(1024, 768))


def assert_same(a: ImageEmbedding, b: ImageEmbedding) -> None:
    assert a.features.dtype == b.features.dtype and a.features.shape == b.features.shape
    assert torch.equal(bits(a.features), bits(b.features))
    assert (a.original_size, a.input_size) == (b.original_size, b.input_size)


def bits(features: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that equality is bit-exactness (NaN payloads and -0.0 included)."""
    return features.contiguous().view(torch.int16 if features.element_size() == 2 else torch.int32)


class ManualClock:
    """The breaker's clock, moved by the test: what it skips must not depend on how busy the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def redis_tier(server: RedisServer, **overrides: object) -> RedisTier:
    options: dict = {"namespace": "test", "ttl_s": 600, "timeout_s": 0.25, "breaker": Breaker(0.2, 1.0)}
    options.update(overrides)
    return RedisTier(server.url, **options)


def disk_tier(directory: Path, max_bytes: int = 10 * 2**20) -> DiskTier:
    return DiskTier(directory, namespace="test", max_bytes=max_bytes, breaker=Breaker(0.2, 1.0))


# -- blob format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_blob_round_trip_is_bit_exact_and_compact(dtype: torch.dtype) -> None:
    original = embedding(1, dtype=dtype)
    blob = encode_blob(original)
    assert len(blob) == HEADER_SIZE + 4 * 4 + original.nbytes  # header, 4 dims, raw values: nothing else
    assert_same(decode_blob(blob), original)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # truncated payload
        lambda b: b + b"\0\0",  # trailing bytes
        lambda b: b[:10],  # truncated header
        lambda b: b"XXXX" + b[4:],  # foreign magic
        lambda b: b[:4] + bytes([9]) + b[5:],  # a future format version
        lambda b: b[:5] + bytes([7]) + b[6:],  # unknown dtype
        lambda b: b[: HEADER_SIZE + 4] + (128).to_bytes(4, "little") + b[HEADER_SIZE + 8 :],  # shape ≠ length
        lambda b: b"",
    ],
)
def test_damaged_blobs_are_refused(damage) -> None:
    with pytest.raises(CorruptBlob):
        decode_blob(damage(encode_blob(embedding(2))))


def test_blob_holds_no_pickle() -> None:
    blob = encode_blob(embedding(3, shape=(1, 2, 2, 2)))
    assert b"\x80\x04" not in blob[:HEADER_SIZE] and blob.startswith(b"LSEM")


# -- breaker -------------------------------------------------------------------------------------------------


def test_breaker_skips_calls_after_a_failure_and_backs_off_exponentially() -> None:
    now = [100.0]
    breaker = Breaker(1.0, 4.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    now[0] += 1.0
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one trial call at a time
    breaker.failed()  # the trial failed: wait twice as long
    now[0] += 1.5
    assert not breaker.allow()
    now[0] += 0.5
    assert breaker.allow()
    breaker.failed()
    now[0] += 4.0  # capped at 4 s, not 8
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow() and breaker.opened == 1


# -- Redis ---------------------------------------------------------------------------------------------------


def test_redis_round_trip_is_bit_exact_with_a_ttl(redis_server: RedisServer) -> None:
    tier = redis_tier(redis_server)
    original = embedding(4)
    assert tier.get("m:v:float16:abc") is None
    assert tier.put("m:v:float16:abc", original)
    assert_same(tier.get("m:v:float16:abc"), original)
    client = redis.Redis.from_url(redis_server.url)
    ttl = client.ttl("test:emb1:m:v:float16:abc")
    assert 0 < ttl <= 600
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["writes"], stats["errors"]) == (1, 1, 1, 0)
    assert stats["state"] == "closed" and stats["read_ms_avg"] > 0


def test_corrupt_redis_entry_is_a_counted_miss_and_deleted(redis_server: RedisServer) -> None:
    tier = redis_tier(redis_server)
    tier.put("k", embedding(5))
    client = redis.Redis.from_url(redis_server.url)
    blob = client.get("test:emb1:k")
    client.set("test:emb1:k", blob[:-100])  # e.g. a writer killed mid-way, or another program's value
    assert tier.get("k") is None
    assert client.exists("test:emb1:k") == 0
    assert tier.stats()["corrupt"] == 1 and tier.stats()["misses"] == 1


def test_redis_clear_deletes_only_its_namespace(redis_server: RedisServer) -> None:
    ours, theirs = redis_tier(redis_server), redis_tier(redis_server, namespace="other")
    for i in range(3):
        ours.put(f"k{i}", embedding(i, shape=(1, 4, 4, 4)))
    theirs.put("k0", embedding(9, shape=(1, 4, 4, 4)))
    client = redis.Redis.from_url(redis_server.url)
    client.set("unrelated", b"x")
    assert ours.clear() == 3
    assert ours.get("k1") is None and theirs.get("k0") is not None and client.get("unrelated") == b"x"


def test_redis_down_costs_one_failure_then_calls_are_skipped_until_it_is_back(
    redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    tier = redis_tier(redis_server, breaker=Breaker(1.0, 30.0, clock=clock))
    tier.put("k", embedding(6))
    redis_server.stop()
    assert tier.get("k") is None  # refused connection: an error, not an exception
    assert tier.put("k2", embedding(7)) is False  # skipped: the breaker is open
    stats = tier.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 1 and stats["state"] == "open"
    redis_server.start()  # empty again: a cache may lose everything
    clock.now += 1.0  # the breaker's retry delay has passed
    assert tier.put("k3", embedding(8)) is True
    assert tier.get("k3") is not None and tier.stats()["state"] == "closed"


def test_redis_that_does_not_answer_times_out_instead_of_hanging(redis_server: RedisServer) -> None:
    tier = redis_tier(redis_server, timeout_s=0.1, breaker=Breaker(1.0, 30.0, clock=ManualClock()))
    tier.put("k", embedding(10))
    redis_server.process.send_signal(19)  # SIGSTOP: the port accepts, nothing answers
    try:
        started = time.perf_counter()
        assert tier.get("k") is None
        assert time.perf_counter() - started < 5  # bounded by the socket timeout (0.1 s), not hung
        assert tier.get("k") is None and tier.stats()["skipped"] == 1  # and the next call does not wait
    finally:
        redis_server.process.send_signal(18)  # SIGCONT


def test_redis_password_is_not_shown() -> None:
    assert redact("redis://:s3cret@cache:6379/2") == "redis://:***@cache:6379/2"
    assert redact("redis://user:s3cret@cache/0") == "redis://user:***@cache/0"
    assert redact("redis://cache:6379/0") == "redis://cache:6379/0"


# -- disk ----------------------------------------------------------------------------------------------------


def test_disk_round_trip_is_bit_exact_and_survives_a_restart(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path)
    original = embedding(11)
    assert tier.get("k") is None and tier.put("k", original)
    assert_same(tier.get("k"), original)
    size = tier.stats()["bytes"]
    tier.close()
    reopened = disk_tier(tmp_path)
    assert_same(reopened.get("k"), original)
    assert reopened.stats()["bytes"] == size == len(encode_blob(original))
    assert not list((reopened.root / "tmp").iterdir())  # no write leftovers


def test_disk_byte_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    small = embedding(0, shape=(1, 16, 32, 32))  # 32 KiB of fp16
    entry = len(encode_blob(small))
    tier = disk_tier(tmp_path, max_bytes=int(3.5 * entry))  # evicting frees down to 90 %: 3 entries stay
    for i, key in enumerate("abc"):
        tier.put(key, embedding(i, shape=(1, 16, 32, 32)))
        os.utime(tier._path(key), (1000 + i, 1000 + i))  # a, b, c from oldest to newest
    assert tier.get("a") is not None  # a hit makes "a" the most recent
    tier.put("d", embedding(3, shape=(1, 16, 32, 32)))
    assert tier.get("b") is None  # the least recently used went first
    assert all(tier.get(key) is not None for key in "acd")
    assert tier.stats()["bytes"] == 3 * entry and tier.stats()["evictions"] == 1
    assert sum(p.stat().st_size for p in tier.root.glob("*/*.emb")) == tier.stats()["bytes"]


def test_disk_refuses_an_entry_larger_than_the_cap(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path, max_bytes=1000)
    assert tier.put("big", embedding(0, shape=(1, 16, 32, 32))) is False
    assert tier.stats()["bytes"] == 0 and tier.stats()["writes"] == 0


def test_corrupt_disk_entry_is_a_counted_miss_and_deleted(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path)
    tier.put("k", embedding(12, shape=(1, 8, 8, 8)))
    path = tier._path("k")
    blob = bytearray(path.read_bytes())
    blob[5] = 99  # bit rot in the header (the dtype code); the length is unchanged
    path.write_bytes(bytes(blob))
    assert tier.get("k") is None and not path.exists()
    assert tier.stats()["corrupt"] == 1 and tier.stats()["bytes"] == 0


def test_lost_size_file_is_recounted(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path)
    tier.put("k", embedding(13, shape=(1, 8, 8, 8)))
    (tier.root / ".bytes").write_text("garbage")  # a crash mid-write
    assert tier.stats()["bytes"] == len(encode_blob(embedding(13, shape=(1, 8, 8, 8))))


WRITER = """
import sys, torch
from models.base import ImageEmbedding
from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.disk_tier import DiskTier
directory, worker, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tier = DiskTier(directory, namespace="test", max_bytes=cap, breaker=Breaker(1, 1))
for i in range(40):
    features = torch.full((1, 16, 32, 32), float(worker * 100 + i), dtype=torch.float16)
    assert tier.put(f"w{worker}-{i}", ImageEmbedding(features, (10, 10), (10, 10)))
    found = tier.get(f"w{worker}-{i}")
    assert found is None or float(found.features[0, 0, 0, 0]) == worker * 100 + i
assert tier.stats()["errors"] == 0, tier.stats()
"""


def test_disk_tier_shared_by_processes_keeps_its_cap(tmp_path: Path) -> None:
    entry = len(encode_blob(embedding(0, shape=(1, 16, 32, 32))))
    cap = 10 * entry
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), str(cap)], env=env)
        for w in range(3)
    ]
    assert [w.wait(120) for w in writers] == [0, 0, 0]
    tier = disk_tier(tmp_path, max_bytes=cap)
    files = list(tier.root.glob("*/*.emb"))
    on_disk = sum(p.stat().st_size for p in files)
    assert on_disk <= cap and on_disk == tier.stats()["bytes"]
    assert len(files) >= 5  # eviction freed down to 90 % of the cap, not everything
    for path in files:  # every entry left is whole: writes were atomic
        decode_blob(path.read_bytes())
    assert not list((tier.root / "tmp").iterdir())


# -- settings -----------------------------------------------------------------------------------------------


def test_settings_pick_one_l2_and_refuse_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELSERVE_CACHE_REDIS_URL", "")  # an empty variable means "not set"
    monkeypatch.delenv("LABELSERVE_CACHE_DISK_DIR", raising=False)
    assert Settings().cache_redis_url is None and build_l2(Settings()) is None
    redis_l2 = build_l2(Settings(cache_redis_url="redis://127.0.0.1:1/0"))  # nothing is contacted yet
    disk_l2 = build_l2(Settings(cache_disk_dir=tmp_path))
    assert isinstance(redis_l2, RedisTier) and isinstance(disk_l2, DiskTier)
    with pytest.raises(ValidationError, match="not both"):
        Settings(cache_redis_url="redis://127.0.0.1:1/0", cache_disk_dir=tmp_path)
    with pytest.raises(ValidationError, match="cache_namespace"):
        Settings(cache_namespace="a b*")
