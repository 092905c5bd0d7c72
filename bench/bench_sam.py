"""SAM click and embed latency: labelserve over HTTP against segment-anything's SamPredictor, in one run.

    python bench/bench_sam.py [--clicks 40] [--cold 3] [--rss-images 500] [--rss-cache-mib 256]

Both sides run MobileSAM with the same seeded random weights (real compute; no checkpoint is obtainable
here) on the same machine, one after the other, never concurrently. Prints markdown tables and writes
bench/out/sam.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import timed_ms  # noqa: E402
from models.sam import build_sam  # noqa: E402
from server.images import decode_image  # noqa: E402
from server.masks import cvat_rle_decode  # noqa: E402
from tests.conftest import encode_image, synthetic_scene, ultralytics_asset  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

MODEL = "mobile_sam"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class Server(ServerProcess):
    def __init__(self, **env: str) -> None:
        weights = tempfile.mkdtemp(prefix="labelserve-bench-")
        environ = {"LABELSERVE_WEIGHTS_DIR": weights, "LABELSERVE_MODELS": MODEL, **env}
        super().__init__(environ, Path(weights) / "server.log", random_init=True, timeout=120)

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def close(self) -> None:
        self.stop()


def test_images() -> dict[str, bytes]:
    bus = ultralytics_asset("bus.jpg").read_bytes()
    big = io.BytesIO()
    Image.open(io.BytesIO(bus)).convert("RGB").resize((4000, 3000), Image.LANCZOS).save(
        big, "JPEG", quality=90
    )
    return {"bus.jpg 810x1080": bus, "4000x3000 (12 MP)": big.getvalue()}


def reference_side(sam: torch.nn.Module, data: bytes, point: list[float], clicks: int, cold: int) -> dict:
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    image = decode_image(data, 10**9)
    with torch.inference_mode():
        set_image = timed_ms(lambda: predictor.set_image(image), cold)
        coords = predictor.transform.apply_coords(np.array([point], np.float32), predictor.original_size)
        points = (torch.as_tensor(coords)[None], torch.ones(1, 1, dtype=torch.int))

        def floor() -> None:
            sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
            sam.mask_decoder(
                image_embeddings=predictor.features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )

        floor()
        floor_ms = timed_ms(floor, clicks)
        predict_ms = timed_ms(
            lambda: predictor.predict(np.array([point]), np.array([1]), multimask_output=True), clicks
        )
    return {"set_image": set_image, "floor": floor_ms, "predict": predict_ms}


def server_side(server: Server, data: bytes, point: list[float], clicks: int, cold: int) -> dict:
    cold_ms, server_encode = [], []
    for _ in range(cold):
        server.http.delete("/v1/cache")
        start = time.perf_counter()
        response = server.http.post(
            f"/v1/sam/{MODEL}/embed", content=data, headers={"content-type": "image/jpeg"}
        )
        cold_ms.append((time.perf_counter() - start) * 1000)
        server_encode.append(response.json()["timings_ms"]["encode"])
    image_id = response.json()["image_id"]
    body = {"image_id": image_id, "points": [point]}
    server.http.post(f"/v1/sam/{MODEL}/segment", json=body)  # warm-up
    warm, sizes = [], []
    for _ in range(clicks):
        start = time.perf_counter()
        reply = server.http.post(f"/v1/sam/{MODEL}/segment", json=body)
        warm.append((time.perf_counter() - start) * 1000)
        sizes.append(len(reply.content))
    stages = reply.json()["timings_ms"]
    cvat = cvat_clicks(server, data, point, clicks)
    return {
        "cold": cold_ms,
        "cold_encode": server_encode,
        "warm": warm,
        "reply_bytes": statistics.median(sizes),
        "last_stages": stages,
        "mask_area": reply.json()["masks"][0]["area"],
        **cvat,
    }


def cvat_clicks(server: Server, data: bytes, point: list[float], clicks: int) -> dict:
    """CVAT's interactor path: the whole frame as base64 in every click, routed by the Nuclio header."""
    payload = {
        "image": base64.b64encode(data).decode(),
        "pos_points": [point],
        "neg_points": [],
        "obj_bbox": [],
    }
    headers = {
        "x-nuclio-function-name": f"labelserve-{MODEL.replace('_', '-')}",
        "x-nuclio-path": "/",
        "content-type": "application/json",
    }
    url = "/api/function_invocations"
    body = orjson.dumps(payload)  # CVAT serialises its request once, whatever server it calls: not timed here
    server.http.post(url, content=body, headers=headers)
    times = []
    for _ in range(clicks):
        start = time.perf_counter()
        reply = server.http.post(url, content=body, headers=headers)
        times.append((time.perf_counter() - start) * 1000)
    points = reply.json()["shapes"][0]["points"]
    width, height = Image.open(io.BytesIO(data)).size
    full = cvat_rle_decode(points, width, height).to_full()
    legacy = orjson.dumps({"mask": (full.astype(np.uint8) * 255).tolist()})
    return {
        "cvat_warm": times,
        "cvat_reply_bytes": len(reply.content),
        "legacy_reply_bytes": len(legacy),
        "request_bytes": len(orjson.dumps(payload)),
    }


def rss_run(images: int, cache_mib: int) -> dict:
    server = Server(LABELSERVE_CACHE_BYTES=str(cache_mib * 2**20))
    try:
        first = encode_image(synthetic_scene(320, 240, seed=10_000))
        server.http.post(f"/v1/sam/{MODEL}/embed", content=first, headers={"content-type": "image/png"})
        baseline = server.rss_mib()
        samples = []
        for i in range(images):
            data = encode_image(synthetic_scene(320, 240, seed=i))
            server.http.post(f"/v1/sam/{MODEL}/embed", content=data, headers={"content-type": "image/png"})
            if (i + 1) % 20 == 0:
                samples.append((i + 1, round(server.rss_mib())))
        stats = server.http.get("/v1/cache/stats").json()["embeddings"]
        return {
            "images": images,
            "cache_cap_mib": cache_mib,
            "rss_after_first_mib": round(baseline),
            "rss_after_mib": round(server.rss_mib()),
            "samples": samples,
            "cache_bytes_mib": round(stats["bytes"] / 2**20, 1),
            "entries": stats["entries"],
            "evictions": stats["evictions"],
        }
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--rss-images", type=int, default=500)
    parser.add_argument("--rss-cache-mib", type=int, default=256)
    parser.add_argument("--only-rss", action="store_true", help="run only the memory measurement")
    args = parser.parse_args()
    if args.only_rss:
        print_tables({"machine": "", "images": {}, "rss": rss_run(args.rss_images, args.rss_cache_mib)})
        return

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)  # the server's default LABELSERVE_RANDOM_SEED: identical weights on both sides
    sam = build_sam(MODEL, None)
    server = Server()
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "images": {},
    }
    try:
        for name, data in test_images().items():
            width, height = Image.open(io.BytesIO(data)).size
            point = [width * 0.45, height * 0.6]
            ref = reference_side(sam, data, point, args.clicks, args.cold)
            ours = server_side(server, data, point, args.clicks, args.cold)
            results["images"][name] = {"reference": ref, "labelserve": ours}
    finally:
        server.close()
    if args.rss_images:
        results["rss"] = rss_run(args.rss_images, args.rss_cache_mib)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "sam.json").write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict) -> None:
    if results["images"]:
        print_latency_tables(results)
    if "rss" in results:
        print_rss(results["rss"])


def print_latency_tables(results: dict) -> None:
    med = statistics.median
    print(f"\nMachine: {results['machine']}. MobileSAM, random-init weights, 1 positive click.\n")
    print(
        "| image | floor: prompt enc + mask dec (p50) | SamPredictor.predict (p50) | labelserve warm click "
        "HTTP p50 / p95 | click / floor | click / predict | reply size |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results["images"].items():
        floor, predict, warm = (
            med(r["reference"]["floor"]),
            med(r["reference"]["predict"]),
            r["labelserve"]["warm"],
        )
        click, p95, reply_kib = med(warm), percentile(warm, 95), r["labelserve"]["reply_bytes"] / 1024
        print(
            f"| {name} | {floor:.1f} ms | {predict:.1f} ms | {click:.1f} / {p95:.1f} ms | "
            f"{click / floor:.2f}× | {click / predict:.2f}× | {reply_kib:.0f} KiB |"
        )
    print(
        "\n| image | raw set_image (p50) | labelserve cold embed over HTTP (p50) | vs raw | "
        "server work outside the encoder (p50) | as share of raw |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results["images"].items():
        raw, cold = med(r["reference"]["set_image"]), med(r["labelserve"]["cold"])
        # Wall time minus the server's own encoder stage: upload, hashing, decoding, HTTP.
        outside = med(
            [c - e for c, e in zip(r["labelserve"]["cold"], r["labelserve"]["cold_encode"], strict=True)]
        )
        print(
            f"| {name} | {raw:.0f} ms | {cold:.0f} ms | {100 * (cold / raw - 1):+.1f} % | {outside:.0f} ms | "
            f"{100 * outside / raw:.1f} % |"
        )
    print(
        "\n| image | native warm click p50 | CVAT warm click p50 / p95 (whole frame as base64 each click) | "
        'CVAT / native | CVAT request | CVAT reply | legacy {"mask": H×W} reply |'
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results["images"].items():
        ours = r["labelserve"]
        native, cvat = med(ours["warm"]), ours["cvat_warm"]
        ratio = med(cvat) / native
        print(
            f"| {name} | {native:.1f} ms | {med(cvat):.1f} / {percentile(cvat, 95):.1f} ms | {ratio:.2f}× "
            f"| {ours['request_bytes'] / 2**20:.1f} MiB | {ours['cvat_reply_bytes'] / 1024:.0f} KiB "
            f"| {ours['legacy_reply_bytes'] / 2**20:.1f} MiB |"
        )


def print_rss(rss: dict) -> None:
    print(
        f"\nRSS after {rss['images']} distinct images with a {rss['cache_cap_mib']} MiB cache cap: "
        f"{rss['rss_after_mib']} MiB (after the first image: {rss['rss_after_first_mib']} MiB; growth "
        f"{rss['rss_after_mib'] - rss['rss_after_first_mib']} MiB). Cache holds {rss['entries']} embeddings "
        f"= {rss['cache_bytes_mib']} MiB, {rss['evictions']} evictions. Samples (images, MiB): "
        f"{rss['samples']}"
    )


if __name__ == "__main__":
    main()
