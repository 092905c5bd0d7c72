"""The tiered read path through the HTTP API, with MobileSAM and a real redis-server: L1 → L2 → encode,
Redis taken away mid-run, and a restarted server (a real process) finding its embeddings in L2."""

from __future__ import annotations

from pathlib import Path

import redis
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.services.embeddings import _l2_key
from server.services.embeddings.l2.blob import decode_blob

from .conftest import encode_image, make_settings, synthetic_scene
from .redis_server import RedisServer
from .server_process import ServerProcess

MODEL = "mobile_sam"
L2_KEY = "labelserve:emb2:mobile_sam:sam-rls1024-v1:float16:{}"


def embed(client: TestClient | object, data: bytes) -> dict:
    response = client.post(f"/v1/sam/{MODEL}/embed", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def click(client: TestClient, image_id: str) -> dict:
    response = client.post(f"/v1/sam/{MODEL}/segment", json={"image_id": image_id, "points": [[10, 10]]})
    assert response.status_code == 200, response.text
    return response.json()


def l1_features(client: TestClient, image_id: str) -> torch.Tensor:
    embedded = client.app.state.services.sam.cached_embedding(MODEL, image_id)
    assert embedded.tier == "l1"
    return embedded.embedding["image_embed"]


def bits(features: torch.Tensor) -> torch.Tensor:
    return features.contiguous().view(torch.int16)


def test_l1_hit_then_l2_hit_fills_l1_and_a_miss_encodes_into_both(tmp_path: Path, redis_server: RedisServer):
    settings = make_settings(tmp_path, cache_redis_url=redis_server.url)
    image = encode_image(synthetic_scene(96, 64, seed=31))
    store = redis.Redis.from_url(redis_server.url)
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        first = embed(client, image)
        key = L2_KEY.format(first["image_id"])
        assert first["cache_tier"] == "encode" and "l2_put" in first["timings_ms"]
        assert store.exists(key)  # the encode filled L2...
        l1 = l1_features(client, first["image_id"])  # ...and L1
        stored = decode_blob(store.get(key), "mobile_sam")
        assert torch.equal(bits(stored["image_embed"]), bits(l1))  # fp16 in L2 is L1's fp16, bit for bit
        assert (stored.original_size, stored.input_size) == ((64, 96), (683, 1024))

        second = embed(client, image)
        assert second["cache_tier"] == "l1" and "l2_get" not in second["timings_ms"]  # L1 first

        assert client.delete("/v1/cache").json()["cleared"]["l2"] is None  # scope=local keeps L2
        third = embed(client, image)
        assert third["cache_tier"] == "l2" and third["cached"] is True
        assert "encode" not in third["timings_ms"] and "decode_image" not in third["timings_ms"]
        assert embed(client, image)["cache_tier"] == "l1"  # the L2 hit filled L1
        assert torch.equal(bits(l1_features(client, first["image_id"])), bits(l1))

        client.delete("/v1/cache")
        assert click(client, first["image_id"])["cache_tier"] == "l2"  # clicks by image_id reach L2 too

        stats = client.get("/v1/cache/stats").json()
        assert stats["encoders"][MODEL]["done"] == {"interactive": 1, "background": 0}  # one encode in all
        l2 = stats["l2"]
        counts = {key: l2[key] for key in ("kind", "hits", "writes", "errors", "state")}
        assert counts == {"kind": "redis", "hits": 2, "writes": 1, "errors": 0, "state": "closed"}

        cleared = client.delete("/v1/cache", params={"scope": "all"}).json()["cleared"]
        assert cleared["l2"] == 1 and not store.exists(key)


def test_redis_stopped_mid_run_requests_still_succeed(tmp_path: Path, redis_server: RedisServer):
    settings = make_settings(tmp_path, cache_redis_url=redis_server.url)
    image = encode_image(synthetic_scene(80, 60, seed=32))
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        image_id = embed(client, image)["image_id"]
        redis_server.stop()
        assert click(client, image_id)["cache_tier"] == "l1"  # L1 hits never touch Redis
        client.delete("/v1/cache")
        again = embed(client, image)  # L2 is unreachable: a miss, and the image is encoded again
        assert again["cache_tier"] == "encode"
        assert click(client, image_id)["cache_tier"] == "l1"
        client.delete("/v1/cache")
        missing = client.post(f"/v1/sam/{MODEL}/segment", json={"image_id": image_id, "points": [[1, 1]]})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "image_not_cached"
        l2 = client.get("/v1/cache/stats").json()["l2"]
        assert l2["errors"] >= 1 and l2["opened"] >= 1 and l2["errors"] + l2["skipped"] >= 3
        assert l2["hits"] == 0
        refused = client.delete("/v1/cache", params={"scope": "all"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "cache_unavailable"


def test_disk_tier_gives_a_restarted_app_its_embeddings_bit_exact(tmp_path: Path):
    settings = make_settings(tmp_path, cache_disk_dir=tmp_path / "l2", cache_disk_bytes=64 * 2**20)
    image = encode_image(synthetic_scene(72, 54, seed=33))
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        image_id = embed(client, image)["image_id"]
        before = l1_features(client, image_id).clone()
    with TestClient(create_app(settings, load_models_in_background=False)) as restarted:
        found = embed(restarted, image)
        assert found["cache_tier"] == "l2" and "encode" not in found["timings_ms"]
        assert torch.equal(bits(l1_features(restarted, image_id)), bits(before))
        stats = restarted.get("/v1/cache/stats").json()
        assert stats["l2"]["kind"] == "disk" and stats["l2"]["hits"] == 1
        assert stats["l2"]["bytes"] <= 64 * 2**20 and stats["encoders"] == {}


def test_l2_entries_are_per_model_and_a_sam2_embedding_round_trips(tmp_path: Path):
    """One image, two models: each encodes and writes its own entry, neither reads the other's, not even
    an entry put under its own key (the blob's architecture tag); SAM 2's three tensors come back from L2
    bit for bit, and give the same masks."""
    settings = make_settings(tmp_path, models=[MODEL, "sam2.1_hiera_tiny"], cache_disk_dir=tmp_path / "l2")
    image = encode_image(synthetic_scene(96, 64, seed=35))
    click = {"points": [[30, 30]], "max_masks": 3, "refine": False}
    with TestClient(create_app(settings, load_models_in_background=False)) as client:
        services = client.app.state.services
        tiers = [embed(client, image)["cache_tier"]]
        png = {"content-type": "image/png"}
        response = client.post("/v1/sam/sam2.1_hiera_tiny/embed", content=image, headers=png)
        image_id, tiers = response.json()["image_id"], [*tiers, response.json()["cache_tier"]]
        assert tiers == ["encode", "encode"]  # no model found the other's entry of the same image
        before = services.sam.cached_embedding("sam2.1_hiera_tiny", image_id).embedding
        first = client.post("/v1/sam/sam2.1_hiera_tiny/segment", json={"image_id": image_id, **click}).json()
        assert client.delete("/v1/cache").status_code == 200  # L1 only
        second = client.post("/v1/sam/sam2.1_hiera_tiny/segment", json={"image_id": image_id, **click}).json()
        assert second["cache_tier"] == "l2" and second["masks"] == first["masks"]
        after = services.sam.cached_embedding("sam2.1_hiera_tiny", image_id).embedding
        assert list(after.tensors) == ["high_res_0", "high_res_1", "vision_feat"]
        assert all(torch.equal(bits(after[n]), bits(before[n])) for n in before.tensors)
        # MobileSAM's entry copied under SAM 2's key is still MobileSAM's: a miss, not an embedding.
        l2, registry = services.sam.embeddings.l2, services.registry
        sam2_key = _l2_key(registry.segmenter("sam2.1_hiera_tiny"), image_id)
        l2._path(sam2_key).write_bytes(l2._path(_l2_key(registry.segmenter(MODEL), image_id)).read_bytes())
        assert client.delete("/v1/cache").status_code == 200
        third = client.post("/v1/sam/sam2.1_hiera_tiny/segment", json={"image_id": image_id, **click})
        assert third.status_code == 404 and third.json()["error"]["code"] == "image_not_cached"
        stats = client.get("/v1/cache/stats").json()["l2"]
        assert (stats["foreign"], stats["corrupt"]) == (1, 0)


def test_restarted_server_process_gets_its_first_embedding_from_redis(
    tmp_path: Path, redis_server: RedisServer
):
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp_path / "data"),
        "LABELSERVE_MODELS": MODEL,
        "LABELSERVE_CACHE_REDIS_URL": redis_server.url,
    }
    image = encode_image(synthetic_scene(64, 64, seed=34))
    with ServerProcess(env, tmp_path / "first.log", random_init=True) as first:
        assert embed(first.http, image)["cache_tier"] == "encode"
    with ServerProcess(env, tmp_path / "second.log", random_init=True) as second:
        found = embed(second.http, image)
        assert found["cache_tier"] == "l2" and "encode" not in found["timings_ms"]
        stats = second.http.get("/v1/cache/stats").json()
        assert stats["encoders"] == {} and stats["l2"]["hits"] == 1  # no encoder was ever used
