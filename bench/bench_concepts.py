"""SAM 3 concepts through the HTTP API: the first concept call on an image, a second phrase on the same
(cached) image, ten phrases at once on it, and the same phrase on a prefetched image.

    python bench/bench_concepts.py [--rounds 3] [--tiny] [--threads 0] [--device cpu]

Seeded random weights (real compute; the gated checkpoint is not needed): the full-size SAM 3 by default
(840 M parameters, 1008-pixel input; about a minute per image encode on 2 CPU cores), or with `--tiny` the
small architecture the tests use (models/sam3.py TINY_CONFIG), which checks that the script works in
seconds. Each round uses images of its own (bus.jpg and zidane.jpg with one pixel changed), so every first
call encodes. Forward hooks count the vision backbone's runs: the second phrase and the prefetched image's
call must add none. Prints a markdown table and writes bench/out/concepts.json (concepts_tiny.json with
--tiny).
"""

from __future__ import annotations

import argparse
import base64
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import report  # noqa: E402
from models.sam3 import TINY_CONFIG, sam3_config  # noqa: E402

MODEL = "sam3"
TEN = ["car", "person", "bus", "bicycle", "traffic light", "dog", "handbag", "window", "wheel", "hat"]


def variant(name: str, index: int) -> bytes:
    """An ultralytics asset with one pixel changed: bytes and pixels no cache holds yet."""
    from tests.conftest import ultralytics_asset

    image = np.asarray(Image.open(ultralytics_asset(name)).convert("RGB")).copy()
    image[0, index % image.shape[1]] = 255 - image[0, index % image.shape[1]]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tests' small SAM 3 (checks the script)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="labelserve-bench-concepts-"))
    if args.tiny:
        sam3_config(TINY_CONFIG).save_pretrained(tmp / "weights" / MODEL)
    settings = Settings(
        models=[MODEL],
        random_init=True,
        weights_dir=tmp / "weights",
        data_dir=tmp / "data",
        device=args.device,
        torch_threads=args.threads,
    )
    started = time.perf_counter()
    app = create_app(settings, load_models_in_background=False)
    with TestClient(app) as client:
        load_s = time.perf_counter() - started
        concept = app.state.services.registry.concept(MODEL)
        runs = {"vision": 0}
        concept.model.vision_encoder.register_forward_hook(
            lambda *_: runs.__setitem__("vision", runs["vision"] + 1)
        )

        def ask(body: dict) -> tuple[float, dict]:
            start = time.perf_counter()
            response = client.post(f"/v1/concepts/{MODEL}", json=body | {"score_threshold": 0.0})
            elapsed = (time.perf_counter() - start) * 1000
            assert response.status_code == 200, response.text
            return elapsed, response.json()

        times: dict[str, list[float]] = {"first": [], "second": [], "ten": [], "prefetched": []}
        for r in range(args.rounds):
            data = variant("bus.jpg", r)
            before = runs["vision"]
            ms, first = ask({"image": {"base64": base64.b64encode(data).decode()}, "text": ["car"]})
            times["first"].append(ms)
            ms, second = ask({"image_id": first["image_id"], "text": [f"person {r}"]})  # a phrase not cached
            times["second"].append(ms)
            ms, _ = ask({"image_id": first["image_id"], "text": TEN})
            times["ten"].append(ms)
            assert second["cache_tier"] == "l1" and runs["vision"] == before + 1

            other = variant("zidane.jpg", r)
            queued = client.post(
                "/v1/prefetch",
                json={"model": MODEL, "images": [{"base64": base64.b64encode(other).decode()}]},
            )
            run_id = queued.json()["id"]
            while client.get(f"/v1/prefetch/{run_id}").json()["state"] in ("queued", "running"):
                time.sleep(0.05)
            before = runs["vision"]
            ms, prefetched = ask({"image": {"base64": base64.b64encode(other).decode()}, "text": ["car"]})
            times["prefetched"].append(ms)
            assert prefetched["cache_tier"] == "l1" and runs["vision"] == before

    median = {key: statistics.median(values) for key, values in times.items()}
    size = "TINY_CONFIG (224 px)" if args.tiny else "full size (1008 px)"
    rows = [
        ("first concept call (encode + text + head)", median["first"]),
        ("second phrase, cached image (new phrase: text + head)", median["second"]),
        ("ten phrases at once, cached image", median["ten"]),
        ("same phrase, prefetched image (head only)", median["prefetched"]),
    ]
    table = "\n".join(
        [
            f"| `python bench/bench_concepts.py{' --tiny' if args.tiny else ''}` ({size}, {args.device}, "
            f"{torch.get_num_threads()} threads) | median ms | × first call |",
            "|---|---|---|",
            *(f"| {name} | {value:.1f} | {value / median['first']:.3f} |" for name, value in rows),
        ]
    )
    results = {
        "model": MODEL,
        "architecture": "tiny" if args.tiny else "full",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_s": round(load_s, 2),
        "rounds": args.rounds,
        "ms": times,
        "median_ms": median,
    }
    marker = "bench_concepts:tiny" if args.tiny else "bench_concepts:full"
    report("concepts_tiny" if args.tiny else "concepts", results, {marker: table})


if __name__ == "__main__":
    main()
