"""The Ray Serve path's cost and correctness against the plain server, on the same machine: click latency
(one annotator, sequential clicks), clicks/s with several annotators clicking at once, and encodes per image.
Each annotator clicks on its own image; the Ray run spreads the images over N worker replicas by their key.

    python bench/bench_ray.py --replicas 1 2 --clients 4 --seconds 20            # CPU: the hop's overhead
    python bench/bench_ray.py --model sam_vit_h --device cuda --replicas 1 2 4 --clients 64   # a GPU host

Needs the `ray` extra. Ray's start-up is excluded: timing starts once every replica answers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import encode_image, synthetic_scene  # noqa: E402
from tests.server_process import ServerProcess, free_port  # noqa: E402


def images(count: int) -> list[bytes]:
    return [encode_image(synthetic_scene(640, 480, seed=seed)) for seed in range(count)]


def measure(url: str, model: str, clients: int, seconds: float) -> dict:
    data = images(clients)
    owners: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=120) as http:
        ids = []
        for one in data:
            reply = http.post(f"/v1/sam/{model}/embed", content=one, headers={"content-type": "image/png"})
            reply.raise_for_status()
            ids.append(reply.json()["image_id"])
            owners[reply.headers.get("x-labelserve-replica", "plain")] += 1

        def click(content_id: str, i: int) -> httpx.Response:
            body = {"image_id": content_id, "points": [[100 + i % 300, 120]], "formats": ["coco_rle"]}
            return http.post(f"/v1/sam/{model}/segment", json=body)

        hop = []  # a route that does no work: what the path itself costs
        for _ in range(40):
            started = time.perf_counter()
            http.get("/healthz").raise_for_status()
            hop.append((time.perf_counter() - started) * 1000)
        sequential = []
        for i in range(40):
            started = time.perf_counter()
            click(ids[0], i).raise_for_status()
            sequential.append((time.perf_counter() - started) * 1000)
        tiers: Counter[str] = Counter()
        latencies: list[float] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def annotator(content_id: str) -> None:
            i = 0
            while time.monotonic() < stop:
                started = time.perf_counter()
                reply = click(content_id, i)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    tiers[reply.json().get("cache_tier", str(reply.status_code)) if reply.is_success else
                          str(reply.status_code)] += 1  # fmt: skip
                    latencies.append(elapsed)
                i += 1

        threads = [threading.Thread(target=annotator, args=(content_id,)) for content_id in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        encodes = 0
        seen: dict[str, int] = {}
        for _ in range(200):  # each replica's stats (a request without an image goes to any replica)
            reply = http.get("/v1/cache/stats")
            stats = reply.json()
            seen[reply.headers.get("x-labelserve-replica", "plain")] = sum(
                sum(e["done"].values()) for e in stats["encoders"].values()
            )
            if len(seen) == len(owners) and len(seen) >= 1 and _all_replicas(seen, owners):
                break
        encodes = sum(seen.values())
    latencies.sort()
    return {
        "healthz_ms_p50": round(statistics.median(hop), 1),
        "sequential_click_ms_p50": round(statistics.median(sequential), 1),
        "clicks_per_s": round(len(latencies) / seconds, 1),
        "click_ms_p50": round(latencies[len(latencies) // 2], 1),
        "click_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 1),
        "tiers": dict(tiers),
        "images_per_replica": dict(owners),
        "encodes_per_image": round(encodes / len(ids), 2),
    }


def _all_replicas(seen: dict[str, int], owners: Counter[str]) -> bool:
    return set(owners) <= set(seen)


def env_for(tmp: Path, model: str, device: str) -> dict[str, str]:
    return {
        "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp / "data"),
        "LABELSERVE_MODELS": model,
        "LABELSERVE_DEVICE": device,
    }


def run_plain(model: str, device: str, clients: int, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="labelserve-ray-bench-"))
    with ServerProcess(
        env_for(tmp, model, device), tmp / "server.log", random_init=True, timeout=300
    ) as server:
        return measure(server.url, model, clients, seconds)


def run_ray(model: str, device: str, replicas: int, clients: int, seconds: float, gpus: float) -> dict:
    import ray
    from ray import serve

    from server.scale.ray_app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="labelserve-ray-bench-"))
    os.environ.update(env_for(tmp, model, device), PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    ray.init(include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"random_init": True, "ray_min_replicas": replicas, "ray_max_replicas": replicas,
                "ray_replica_num_cpus": 0.5, "ray_replica_num_gpus": gpus}  # fmt: skip
        serve.run(build_app(args), name="labelserve", route_prefix="/")
        return measure(f"http://127.0.0.1:{port}", model, clients, seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    args = parser.parse_args()
    results = {"plain": run_plain(args.model, args.device, args.clients, args.seconds)}
    print(json.dumps({"plain": results["plain"]}), flush=True)
    for replicas in args.replicas:
        found = run_ray(args.model, args.device, replicas, args.clients, args.seconds, args.gpus_per_replica)
        results[f"ray_{replicas}"] = found
        print(json.dumps({f"ray_{replicas}": found}), flush=True)


if __name__ == "__main__":
    main()
