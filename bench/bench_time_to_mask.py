"""Time to mask: what an annotator waits for, from asking for an image in object storage to the N-th mask.

    python bench/bench_time_to_mask.py [--models mobile_sam sam_vit_b] [--repeats 3]

For each model, `labelserve serve --random-init` reads 810x1080 JPEGs (bus.jpg, each with a unique stamp)
from moto's S3 server on loopback, as it reads B2. One annotator's sequence, timed end to end over HTTP:
embed by `s3://` URL, then clicks that each add a point (refinement on, as in CVAT). Two cases:
- cold: nothing cached, so the first mask waits for the object GET, the decode and the encode;
- prefetched: `POST /v1/prefetch` ran earlier (not timed), so the embed is a revalidating GET and an L1 hit.
Prints the p50 over the repeats of the time to the 1st, 3rd and 5th mask, and writes bench/out/ttm.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_memory import stamped_jpeg  # noqa: E402
from bench.common import SamServer, report  # noqa: E402
from tests.conftest import ultralytics_asset  # noqa: E402
from tests.s3_helpers import moto_s3  # noqa: E402

BUCKET = "frames"
MASKS = (1, 3, 5)
POINTS = [(0.45, 0.6), (0.5, 0.4), (0.3, 0.7), (0.6, 0.75), (0.4, 0.3)]


def annotate(server: SamServer, model: str, url: str, size: tuple[int, int]) -> list[float]:
    """Seconds from the embed request to each mask, for max(MASKS) clicks."""
    width, height = size
    start = time.perf_counter()
    embedded = server.http.post(f"/v1/sam/{model}/embed", json={"image": {"url": url}})
    embedded.raise_for_status()
    image_id, points, done = embedded.json()["image_id"], [], []
    for fx, fy in POINTS[: max(MASKS)]:
        points.append([fx * width, fy * height])
        click = server.http.post(f"/v1/sam/{model}/segment", json={"image_id": image_id, "points": points})
        click.raise_for_status()
        done.append(time.perf_counter() - start)
    return done


def prefetch(server: SamServer, model: str, url: str) -> None:
    run = server.http.post("/v1/prefetch", json={"model": model, "images": [{"url": url}]}).json()
    while (status := server.http.get(f"/v1/prefetch/{run['id']}").json())["state"] in ("queued", "running"):
        time.sleep(0.05)
    assert status["done"] == 1, status


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mobile_sam", "sam_vit_b"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = np.asarray(Image.open(ultralytics_asset("bus.jpg")).convert("RGB"))
    size = (base.shape[1], base.shape[0])
    results: dict = {"models": {}}
    with moto_s3() as moto:
        moto.create_bucket(BUCKET)
        s3 = moto.client()
        profiles = json.dumps({"bench": moto.profile([BUCKET])})
        for m, model in enumerate(args.models):
            urls = {"cold": [], "prefetched": []}
            for case in urls:
                for r in range(args.repeats):
                    key = f"{model}/{case}/{r}.jpg"
                    s3.put_object(
                        Bucket=BUCKET, Key=key, Body=stamped_jpeg(base, 1000 * m + 10 * r + len(case))
                    )
                    urls[case].append(f"s3://{BUCKET}/{key}")
            with SamServer(model, timeout=600, LABELSERVE_STORAGE_PROFILES=profiles) as server:
                runs = {"cold": [], "prefetched": []}
                for r in range(args.repeats):
                    runs["cold"].append(annotate(server, model, urls["cold"][r], size))
                    prefetch(server, model, urls["prefetched"][r])
                    runs["prefetched"].append(annotate(server, model, urls["prefetched"][r], size))
            results["models"][model] = runs
            print(f"{model}: {runs}", flush=True)
    report("ttm", results, {"bench_time_to_mask": render(results)})


def render(results: dict) -> str:
    def cell(runs: list[list[float]]) -> str:
        return " / ".join(f"{statistics.median(run[n - 1] for run in runs):.2f} s" for n in MASKS)

    masks = " / ".join(map(str, MASKS))
    lines = [
        f"| model | cold: S3 GET + embed + clicks, to mask {masks} | prefetched: to mask {masks} |",
        "|---|---|---|",
    ]
    for model, runs in results["models"].items():
        lines.append(f"| {model} | {cell(runs['cold'])} | {cell(runs['prefetched'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
