"""Images from S3-compatible storage: moto's S3 server on loopback (IAM authentication on), in one run.

    python bench/bench_s3.py [--reads 200] [--cold 5]

1. One read through labelserve's ObjectStore (bus.jpg, 137 KB): a cold GET; a cached read revalidated with
   If-None-Match (a 304, the default); a cached read inside LABELSERVE_S3_REVALIDATE_AFTER_S (no request).
2. A click on a cold image over HTTP: POST /segment with {"image": {"url": "s3://..."}} for a key the server
   has never read and an empty embedding cache (read + encode + decode), against the same click with the
   image inline as base64. MobileSAM with seeded random weights (real compute).

moto answers from Python on the same 2 cores, so its times are an upper bound for the request handling and
include nothing of a WAN round trip to B2. Prints markdown tables and writes bench/out/s3.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import timed_ms  # noqa: E402
from server.inputs.objectstore.store import ObjectStore  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.conftest import ultralytics_asset  # noqa: E402
from tests.s3_helpers import MotoS3, moto_s3  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

BUCKET = "bench-frames"
MODEL = "mobile_sam"
POINT = [400.0, 600.0]


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def read_costs(moto: MotoS3, data: bytes, reads: int) -> dict:
    profile = moto.profile([BUCKET])
    revalidating = ObjectStore(Settings(storage_profiles={"b2": profile}))
    windowed = ObjectStore(Settings(storage_profiles={"b2": profile}, s3_revalidate_after_s=3600))
    keys = [f"reads/{i}.jpg" for i in range(reads)]
    s3 = moto.client()
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    urls = iter(f"s3://{BUCKET}/{key}" for key in keys)
    cold = timed_ms(lambda: revalidating.read(next(urls)), reads)
    url = f"s3://{BUCKET}/{keys[0]}"
    windowed.read(url)
    return {
        "cold_get": cold,
        "revalidated_304": timed_ms(lambda: revalidating.read(url), reads),
        "within_window": timed_ms(lambda: windowed.read(url), reads),
    }


def cold_clicks(moto: MotoS3, data: bytes, rounds: int) -> dict:
    s3 = moto.client()
    for i in range(rounds):
        s3.put_object(Bucket=BUCKET, Key=f"clicks/{i}.jpg", Body=data)
    weights = tempfile.mkdtemp(prefix="labelserve-bench-s3-")
    env = {
        "LABELSERVE_WEIGHTS_DIR": weights,
        "LABELSERVE_MODELS": MODEL,
        "LABELSERVE_DATA_DIR": str(Path(weights) / "data"),
        "LABELSERVE_STORAGE_PROFILES": json.dumps({"b2": moto.profile([BUCKET])}),
    }
    inline = {"base64": base64.b64encode(data).decode()}
    results: dict[str, list[float]] = {"s3": [], "s3_read": [], "base64": [], "base64_read": []}
    with ServerProcess(env, Path(weights) / "server.log", random_init=True, timeout=120) as server:
        warm = {"image": inline, "points": [POINT]}
        server.http.post(f"/v1/sam/{MODEL}/segment", json=warm).raise_for_status()  # first-call costs
        for i in range(rounds):
            for kind, image in (("s3", {"url": f"s3://{BUCKET}/clicks/{i}.jpg"}), ("base64", inline)):
                server.http.delete("/v1/cache")
                start = time.perf_counter()
                reply = server.http.post(f"/v1/sam/{MODEL}/segment", json={"image": image, "points": [POINT]})
                results[kind].append((time.perf_counter() - start) * 1000)
                reply.raise_for_status()
                assert reply.json()["cached"] is False
                results[f"{kind}_read"].append(reply.json()["timings_ms"]["read"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reads", type=int, default=200, help="reads per kind in part 1")
    parser.add_argument("--cold", type=int, default=5, help="cold clicks per kind in part 2")
    args = parser.parse_args()
    data = ultralytics_asset("bus.jpg").read_bytes()
    with moto_s3() as moto:
        moto.create_bucket(BUCKET)
        reads = read_costs(moto, data, args.reads)
        clicks = cold_clicks(moto, data, args.cold)
    summary = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "image_bytes": len(data),
        "reads_ms_median": {k: median(v) for k, v in reads.items()},
        "cold_click_ms_median": {k: median(v) for k, v in clicks.items()},
    }
    print("| one read (moto, loopback) | median ms |\n|---|---|")
    for kind, value in summary["reads_ms_median"].items():
        print(f"| {kind} | {value} |")
    print("\n| cold click | total ms (median) | of which reading the image |\n|---|---|---|")
    for kind in ("s3", "base64"):
        print(f"| {kind} | {median(clicks[kind])} | {median(clicks[kind + '_read'])} |")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "s3.json").write_text(json.dumps({"summary": summary, "reads": reads, "clicks": clicks}, indent=1))


if __name__ == "__main__":
    main()
