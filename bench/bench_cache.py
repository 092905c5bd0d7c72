"""The embedding cache tiers and prefetch, measured in one run against a real redis-server:

    python bench/bench_cache.py [--clicks 40] [--fetches 200] [--prefetch-images 8] [--prefetch-rounds 2]
                                [--cold-url URL]

- warm click from L1: /segment by image_id, the embedding in the server's L1;
- click after an L2 hit: L1 cleared (DELETE /v1/cache) before each click, so each click reads Redis;
- the fetch of one 2 MiB fp16 embedding (MobileSAM, 256×64×64) from Redis and from the disk tier, in
  process: the raw GET, and the tier's get (GETEX + validation + a tensor over the reply's bytes);
- prefetch throughput: POST /v1/prefetch over N distinct JPEGs, against N sequential /embed calls on N
  others, in rounds that alternate which goes first;
- --cold-url: an embed of an image by URL (s3://… once object-store readers exist) with every tier empty.

MobileSAM with seeded random weights (real compute), in a `labelserve serve` process on loopback.
Prints a markdown table and writes bench/out/cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import timed_ms  # noqa: E402
from models.base import ImageEmbedding  # noqa: E402
from server.services.embeddings.l2.blob import VERSION  # noqa: E402
from server.services.embeddings.l2.breaker import Breaker  # noqa: E402
from server.services.embeddings.l2.disk_tier import DiskTier  # noqa: E402
from server.services.embeddings.l2.redis_tier import RedisTier  # noqa: E402
from tests.conftest import encode_image, synthetic_scene, ultralytics_asset  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

ARCHITECTURE = "sam_vit_b"  # the tag the tier's blobs carry

MODEL = "mobile_sam"


def summary(values: list[float]) -> dict:
    return {"p50": statistics.median(values), "p95": float(np.percentile(values, 95)), "n": len(values)}


def clicks(server: ServerProcess, image: bytes, count: int) -> dict:
    headers = {"content-type": "image/jpeg"}
    image_id = server.http.post(f"/v1/sam/{MODEL}/embed", content=image, headers=headers).json()["image_id"]
    body = {"image_id": image_id, "points": [[400, 600]]}

    def click(expected_tier: str) -> dict:
        reply = server.http.post(f"/v1/sam/{MODEL}/segment", json=body).json()
        assert reply["cache_tier"] == expected_tier, reply
        return reply

    click("l1")  # warm-up
    warm = timed_ms(lambda: click("l1"), count)
    after_l2, l2_get = [], []
    for _ in range(count):
        server.http.delete("/v1/cache")  # this process's L1 only: the next click reads Redis
        start = time.perf_counter()
        reply = click("l2")
        after_l2.append((time.perf_counter() - start) * 1000)
        l2_get.append(reply["timings_ms"]["l2_get"])
    return {"warm_l1": summary(warm), "after_l2_hit": summary(after_l2), "server_l2_get": summary(l2_get)}


def fetches(redis_url: str, count: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    features = (torch.randn((1, 256, 64, 64), generator=generator) * 0.3).to(torch.float16)
    embedding = ImageEmbedding({"image_embed": features}, (1080, 810), (1024, 768))
    tier = RedisTier(redis_url, namespace="bench", ttl_s=600, timeout_s=1.0, breaker=Breaker(1, 30))
    tier.put("fetch", embedding, ARCHITECTURE)
    client = redis.Redis.from_url(redis_url)
    raw = client.get(f"bench:emb{VERSION}:fetch")
    tier.get("fetch", ARCHITECTURE)
    results = {
        "blob_bytes": len(raw),
        "redis_raw_get": summary(timed_ms(lambda: client.get(f"bench:emb{VERSION}:fetch"), count)),
        "redis_tier_get": summary(timed_ms(lambda: tier.get("fetch", ARCHITECTURE), count)),
    }
    with tempfile.TemporaryDirectory() as directory:
        disk = DiskTier(Path(directory), namespace="bench", max_bytes=2**30, breaker=Breaker(1, 30))
        disk.put("fetch", embedding, ARCHITECTURE)
        disk.get("fetch", ARCHITECTURE)
        results["disk_tier_get"] = summary(timed_ms(lambda: disk.get("fetch", ARCHITECTURE), count))
        results["disk_tier_put"] = summary(
            timed_ms(lambda: disk.put("fetch", embedding, ARCHITECTURE), min(count, 50))
        )
        disk.close()
    results["redis_tier_put"] = summary(
        timed_ms(lambda: tier.put("fetch", embedding, ARCHITECTURE), min(count, 50))
    )
    tier.close()
    return results


def prefetch_vs_sequential(server: ServerProcess, count: int, rounds: int, directory: Path) -> dict:
    """Prefetch N JPEG files, and embed N others one by one: the same encoder, the same kind of image.
    Rounds alternate which goes first, since other processes' load drifts over minutes on a shared host."""
    rates: dict[str, list[float]] = {"prefetch": [], "sequential": []}
    for round_ in range(rounds):
        paths = []
        for i in range(2 * count):
            path = directory / f"frame_{round_}_{i:03d}.jpg"
            image = synthetic_scene(1280, 720, seed=1000 * (round_ + 1) + i)
            path.write_bytes(encode_image(image, "JPEG", quality=90))
            paths.append(path)
        order = [("prefetch", paths[:count]), ("sequential", paths[count:])]
        for kind, batch in order if round_ % 2 == 0 else order[::-1]:
            rates[kind].append(
                count / (prefetch(server, batch) if kind == "prefetch" else sequential(server, batch))
            )
    return {
        "images": count,
        "rounds": rounds,
        "prefetch_images_per_s": rates["prefetch"],
        "sequential_images_per_s": rates["sequential"],
    }


def prefetch(server: ServerProcess, paths: list[Path]) -> float:
    """Seconds from the run's start to its end, as the server recorded them."""
    body = {"model": MODEL, "source": {"paths": [str(path) for path in paths]}}
    run_id = server.http.post("/v1/prefetch", json=body).json()["id"]
    # Polled slowly: on 2 cores every request handled preempts a torch thread and stalls the encoder.
    while (status := server.http.get(f"/v1/prefetch/{run_id}").json())["state"] in ("queued", "running"):
        time.sleep(1.0)
    assert status["state"] == "completed" and status["encoded"] == len(paths), status
    started, finished = (datetime.fromisoformat(status[k]) for k in ("started_at", "finished_at"))
    return (finished - started).total_seconds()


def sequential(server: ServerProcess, paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        reply = server.http.post(
            f"/v1/sam/{MODEL}/embed", content=path.read_bytes(), headers={"content-type": "image/jpeg"}
        ).json()
        assert reply["cache_tier"] == "encode", reply
    return time.perf_counter() - started


def cold_by_url(server: ServerProcess, url: str) -> dict:
    server.http.delete("/v1/cache", params={"scope": "all"})
    started = time.perf_counter()
    reply = server.http.post(f"/v1/sam/{MODEL}/embed", json={"image": {"url": url}})
    wall = (time.perf_counter() - started) * 1000
    assert reply.status_code == 200, reply.text
    return {"url": url, "wall_ms": wall, "timings_ms": reply.json()["timings_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--fetches", type=int, default=200)
    parser.add_argument("--prefetch-images", type=int, default=8)
    parser.add_argument("--prefetch-rounds", type=int, default=2)
    parser.add_argument("--cold-url", help="an image URL (e.g. s3://bucket/key) to time a cold embed of")
    args = parser.parse_args()

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, redis-py {redis.__version__}"
    }
    with tempfile.TemporaryDirectory(prefix="labelserve-bench-cache-") as tmp:
        tmp_path = Path(tmp)
        with RedisServer(tmp_path / "redis") as redis_server:
            env = {
                "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"),
                "LABELSERVE_DATA_DIR": str(tmp_path / "data"),
                "LABELSERVE_MODELS": MODEL,
                "LABELSERVE_CACHE_REDIS_URL": redis_server.url,
                "LABELSERVE_URL_ALLOW_PRIVATE": "true",
            }
            with ServerProcess(env, tmp_path / "server.log", random_init=True, timeout=180) as server:
                results["clicks"] = clicks(server, ultralytics_asset("bus.jpg").read_bytes(), args.clicks)
                results["fetch"] = fetches(redis_server.url, args.fetches)
                results["prefetch"] = prefetch_vs_sequential(
                    server, args.prefetch_images, args.prefetch_rounds, tmp_path
                )
                if args.cold_url:
                    results["cold_url"] = cold_by_url(server, args.cold_url)
                results["server_stats"] = server.http.get("/v1/cache/stats").json()
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "cache.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    def ms(entry: dict) -> str:
        return f"{entry['p50']:.2f} / {entry['p95']:.2f} ms"

    c, f, p = results["clicks"], results["fetch"], results["prefetch"]
    print(f"\nMachine: {results['machine']}. MobileSAM, random-init weights; bus.jpg (810×1080), 1 click.\n")
    print("| measurement | p50 / p95 (or rate) |")
    print("|---|---|")
    print(f"| warm click, embedding in L1 (HTTP, by image_id) | {ms(c['warm_l1'])} |")
    print(f"| click after an L2 (Redis) hit, L1 cleared before each (HTTP) | {ms(c['after_l2_hit'])} |")
    print(f"| … of which the server's l2_get stage | {ms(c['server_l2_get'])} |")
    size = f"{f['blob_bytes'] / 2**20:.2f} MiB"
    print(f"| Redis GET of a {size} fp16 embedding blob (redis-py, loopback) | {ms(f['redis_raw_get'])} |")
    print(f"| Redis tier get: GETEX + validation + tensor (target ≤ 5 ms) | {ms(f['redis_tier_get'])} |")
    print(f"| Redis tier put (SET with TTL) | {ms(f['redis_tier_put'])} |")
    print(f"| disk tier get (page cache warm) | {ms(f['disk_tier_get'])} |")
    print(f"| disk tier put (tmp + rename, under the lock) | {ms(f['disk_tier_put'])} |")

    def rates(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values) + " images/s"

    ratio = statistics.median(p["prefetch_images_per_s"]) / statistics.median(p["sequential_images_per_s"])
    what = f"{p['images']} JPEGs 1280×720, {p['rounds']} rounds"
    print(f"| prefetch ({what}, paths source) | {rates(p['prefetch_images_per_s'])} |")
    print(f"| sequential /embed ({what}) | {rates(p['sequential_images_per_s'])} |")
    print(f"| prefetch / sequential, medians | {ratio:.2f}× |")
    if "cold_url" in results:
        cold = results["cold_url"]
        print(f"| cold embed by URL ({cold['url']}), all tiers empty | {cold['wall_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
