"""The L2 tiers on their own, against a real redis-server and a real directory: blob format, validation,
the circuit breaker, the disk tier's byte cap across processes and restarts."""

from __future__ import annotations

import os
import struct
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
from server.services.embeddings.l2.blob import (
    HEADER_SIZE,
    VERSION,
    CorruptBlob,
    ForeignBlob,
    decode_blob,
    encode_blob,
)
from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.disk_tier import DiskTier
from server.services.embeddings.l2.redis_tier import RedisTier, redact
from server.settings import Settings

from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]


ARCH = "sam_vit_b"  # the architecture tag every blob of these tests carries


def embedding(
    seed: int = 0, shape: tuple[int, ...] = (1, 256, 64, 64), dtype=torch.float16
) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    features = (torch.randn(shape, generator=generator) * 0.3).to(dtype)
    return ImageEmbedding({"image_embed": features}, original_size=(1080, 810), input_size=(1024, 768))


def sam2_like(seed: int = 0) -> ImageEmbedding:
    """Three named tensors of mixed precision (a float32 one, as to_cache keeps where float16 overflows)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"high_res_0": (1, 32, 64, 64), "high_res_1": (1, 64, 32, 32), "vision_feat": (1, 256, 16, 16)}
    tensors = {name: torch.randn(shape, generator=generator).half() for name, shape in shapes.items()}
    tensors["high_res_1"] = tensors["high_res_1"].float() * 1e5
    return ImageEmbedding(tensors, original_size=(720, 1280), input_size=(1024, 1024))


def assert_same(a: ImageEmbedding, b: ImageEmbedding) -> None:
    assert list(a.tensors) == list(b.tensors)
    for name, tensor in a.tensors.items():
        other = b[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape
        assert torch.equal(bits(tensor), bits(other))
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
    blob = encode_blob(original, ARCH)
    # header, tag, one table entry (4 bytes, 4 dims, the name), zero padding to 16 bytes, raw values
    table_end = HEADER_SIZE + len(ARCH) + 4 + 4 * 4 + len("image_embed")
    assert len(blob) == table_end + (-table_end % 16) + original.nbytes
    assert_same(decode_blob(blob, ARCH), original)


def test_blob_of_several_tensors_round_trips_with_each_dtype() -> None:
    original = sam2_like(1)
    decoded = decode_blob(encode_blob(original, "sam2.1_hiera_tiny"), "sam2.1_hiera_tiny")
    assert_same(decoded, original)
    assert decoded.nbytes == original.nbytes == (32 * 64 * 64 + 256 * 16 * 16) * 2 + 64 * 32 * 32 * 4
    assert all(t.data_ptr() % 16 == 0 for t in decoded.tensors.values())  # each tensor starts aligned


def test_blob_of_another_architecture_is_never_decoded() -> None:
    blob = encode_blob(embedding(1), "sam_vit_b")
    with pytest.raises(ForeignBlob):
        decode_blob(blob, "sam_vit_l")  # the same shape: only the tag tells them apart
    with pytest.raises(ForeignBlob):
        decode_blob(encode_blob(sam2_like(), "sam2.1_hiera_tiny"), "sam2.1_hiera_large")


def version_1_blob(original: ImageEmbedding) -> bytes:
    """A blob as labelserve's format version 1 wrote it: one unnamed tensor, no architecture tag."""
    features = original["image_embed"].numpy()
    header = struct.pack("<4sBBBBIIII", b"LSEM", 1, 1, features.ndim, 0, *original.original_size,
                         *original.input_size)  # fmt: skip
    return header + b"".join(struct.pack("<I", d) for d in features.shape) + features.tobytes()


TABLE = HEADER_SIZE + len(ARCH)  # where the first tensor's table entry starts


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # truncated payload
        lambda b: b + b"\0\0",  # trailing bytes
        lambda b: b[:10],  # truncated header
        lambda b: b"XXXX" + b[4:],  # foreign magic
        lambda b: b[:4] + bytes([9]) + b[5:],  # a future format version
        lambda b: b[:5] + bytes([0]) + b[6:],  # no tensors
        lambda b: b[:5] + bytes([2]) + b[6:],  # a second tensor the table does not hold
        lambda b: b[: TABLE + 1] + bytes([7]) + b[TABLE + 2 :],  # unknown dtype
        lambda b: b[: TABLE + 8] + (128).to_bytes(4, "little") + b[TABLE + 12 :],  # shape ≠ length
        lambda b: b"",
    ],
)
def test_damaged_blobs_are_refused(damage) -> None:
    with pytest.raises(CorruptBlob):
        decode_blob(damage(encode_blob(embedding(2), ARCH)), ARCH)


def test_version_1_blobs_are_refused_and_live_under_another_prefix(tmp_path: Path) -> None:
    """Blobs of the single-tensor format are never read as embeddings: they are corrupt to this version,
    and the tiers look under `emb2`, where version 1 never wrote."""
    old = version_1_blob(embedding(4))
    with pytest.raises(CorruptBlob, match="version-2"):
        decode_blob(old, ARCH)
    tier = disk_tier(tmp_path)
    assert tier.root.name == f"emb{VERSION}" == "emb2"
    legacy = tier.root.parent / "emb1" / "ab" / "x.emb"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(old)
    tier._path("k").parent.mkdir(exist_ok=True)
    tier._path("k").write_bytes(old)  # even under the key itself it is a miss, then deleted as corrupt
    assert tier.get("k", ARCH) is None and tier.stats()["corrupt"] == 1 and legacy.exists()


def test_blob_holds_no_pickle() -> None:
    blob = encode_blob(embedding(3, shape=(1, 2, 2, 2)), ARCH)
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
    assert tier.get("m:v:float16:abc", ARCH) is None
    assert tier.put("m:v:float16:abc", original, ARCH)
    assert_same(tier.get("m:v:float16:abc", ARCH), original)
    client = redis.Redis.from_url(redis_server.url)
    ttl = client.ttl("test:emb2:m:v:float16:abc")
    assert 0 < ttl <= 600
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["writes"], stats["errors"]) == (1, 1, 1, 0)
    assert stats["state"] == "closed" and stats["read_ms_avg"] > 0


def test_corrupt_redis_entry_is_a_counted_miss_and_deleted(redis_server: RedisServer) -> None:
    tier = redis_tier(redis_server)
    tier.put("k", embedding(5), ARCH)
    client = redis.Redis.from_url(redis_server.url)
    blob = client.get("test:emb2:k")
    client.set("test:emb2:k", blob[:-100])  # e.g. a writer killed mid-way, or another program's value
    assert tier.get("k", ARCH) is None
    assert client.exists("test:emb2:k") == 0
    assert tier.stats()["corrupt"] == 1 and tier.stats()["misses"] == 1


def test_redis_clear_deletes_only_its_namespace(redis_server: RedisServer) -> None:
    ours, theirs = redis_tier(redis_server), redis_tier(redis_server, namespace="other")
    for i in range(3):
        ours.put(f"k{i}", embedding(i, shape=(1, 4, 4, 4)), ARCH)
    theirs.put("k0", embedding(9, shape=(1, 4, 4, 4)), ARCH)
    client = redis.Redis.from_url(redis_server.url)
    client.set("unrelated", b"x")
    assert ours.clear() == 3
    assert (
        ours.get("k1", ARCH) is None
        and theirs.get("k0", ARCH) is not None
        and client.get("unrelated") == b"x"
    )


def test_redis_down_costs_one_failure_then_calls_are_skipped_until_it_is_back(
    redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    tier = redis_tier(redis_server, breaker=Breaker(1.0, 30.0, clock=clock))
    tier.put("k", embedding(6), ARCH)
    redis_server.stop()
    assert tier.get("k", ARCH) is None  # refused connection: an error, not an exception
    assert tier.put("k2", embedding(7), ARCH) is False  # skipped: the breaker is open
    stats = tier.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 1 and stats["state"] == "open"
    redis_server.start()  # empty again: a cache may lose everything
    clock.now += 1.0  # the breaker's retry delay has passed
    assert tier.put("k3", embedding(8), ARCH) is True
    assert tier.get("k3", ARCH) is not None and tier.stats()["state"] == "closed"


def test_redis_that_does_not_answer_times_out_instead_of_hanging(redis_server: RedisServer) -> None:
    tier = redis_tier(redis_server, timeout_s=0.1, breaker=Breaker(1.0, 30.0, clock=ManualClock()))
    tier.put("k", embedding(10), ARCH)
    redis_server.process.send_signal(19)  # SIGSTOP: the port accepts, nothing answers
    try:
        started = time.perf_counter()
        assert tier.get("k", ARCH) is None
        assert time.perf_counter() - started < 5  # bounded by the socket timeout (0.1 s), not hung
        assert tier.get("k", ARCH) is None and tier.stats()["skipped"] == 1  # and the next call does not wait
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
    assert tier.get("k", ARCH) is None and tier.put("k", original, ARCH)
    assert_same(tier.get("k", ARCH), original)
    size = tier.stats()["bytes"]
    tier.close()
    reopened = disk_tier(tmp_path)
    assert_same(reopened.get("k", ARCH), original)
    assert reopened.stats()["bytes"] == size == len(encode_blob(original, ARCH))
    assert not list((reopened.root / "tmp").iterdir())  # no write leftovers


def test_disk_byte_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    small = embedding(0, shape=(1, 16, 32, 32))  # 32 KiB of fp16
    entry = len(encode_blob(small, ARCH))
    tier = disk_tier(tmp_path, max_bytes=int(3.5 * entry))  # evicting frees down to 90 %: 3 entries stay
    for i, key in enumerate("abc"):
        tier.put(key, embedding(i, shape=(1, 16, 32, 32)), ARCH)
        os.utime(tier._path(key), (1000 + i, 1000 + i))  # a, b, c from oldest to newest
    assert tier.get("a", ARCH) is not None  # a hit makes "a" the most recent
    tier.put("d", embedding(3, shape=(1, 16, 32, 32)), ARCH)
    assert tier.get("b", ARCH) is None  # the least recently used went first
    assert all(tier.get(key, ARCH) is not None for key in "acd")
    assert tier.stats()["bytes"] == 3 * entry and tier.stats()["evictions"] == 1
    assert sum(p.stat().st_size for p in tier.root.glob("*/*.emb")) == tier.stats()["bytes"]


def test_disk_refuses_an_entry_larger_than_the_cap(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path, max_bytes=1000)
    assert tier.put("big", embedding(0, shape=(1, 16, 32, 32)), ARCH) is False
    assert tier.stats()["bytes"] == 0 and tier.stats()["writes"] == 0


def test_corrupt_disk_entry_is_a_counted_miss_and_deleted(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path)
    tier.put("k", embedding(12, shape=(1, 8, 8, 8)), ARCH)
    path = tier._path("k")
    blob = bytearray(path.read_bytes())
    blob[5] = 99  # bit rot in the header (the tensor count); the length is unchanged
    path.write_bytes(bytes(blob))
    assert tier.get("k", ARCH) is None and not path.exists()
    assert tier.stats()["corrupt"] == 1 and tier.stats()["bytes"] == 0


def test_lost_size_file_is_recounted(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path)
    tier.put("k", embedding(13, shape=(1, 8, 8, 8)), ARCH)
    (tier.root / ".bytes").write_text("garbage")  # a crash mid-write
    assert tier.stats()["bytes"] == len(encode_blob(embedding(13, shape=(1, 8, 8, 8)), ARCH))


WRITER = """
import sys, torch
from models.base import ImageEmbedding
from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.disk_tier import DiskTier
directory, worker, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tier = DiskTier(directory, namespace="test", max_bytes=cap, breaker=Breaker(1, 1))
for i in range(40):
    features = torch.full((1, 16, 32, 32), float(worker * 100 + i), dtype=torch.float16)
    assert tier.put(f"w{worker}-{i}", ImageEmbedding({"f": features}, (10, 10), (10, 10)), "sam_vit_b")
    found = tier.get(f"w{worker}-{i}", "sam_vit_b")
    assert found is None or float(found["f"][0, 0, 0, 0]) == worker * 100 + i
assert tier.stats()["errors"] == 0, tier.stats()
"""


def test_disk_tier_shared_by_processes_keeps_its_cap(tmp_path: Path) -> None:
    entry = len(encode_blob(embedding(0, shape=(1, 16, 32, 32)), ARCH))
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
        decode_blob(path.read_bytes(), ARCH)
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
