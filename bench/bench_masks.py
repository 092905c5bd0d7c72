"""Time the mask codecs on a 4000x3000 (12 MP) mask with a large blob.

Usage: python bench/bench_masks.py [repeats]
Prints median milliseconds per call. Two masks: a smooth ellipse (2 runs per row) and the same ellipse
with 300 toggled squares (tens of thousands of runs), both given as a full-image 12 MP RegionMask.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.shapes import RegionMask, polygons
from server.formats.rle import coco_rle, coco_rle_decode, cvat_detector_mask, cvat_rle, cvat_rle_decode

W, H = 4000, 3000


def make_masks() -> dict[str, np.ndarray]:
    yy, xx = np.ogrid[:H, :W]
    ellipse = (xx - 2000) ** 2 / 1900**2 + (yy - 1500) ** 2 / 1400**2 <= 1
    noisy = ellipse.copy()
    rng = np.random.default_rng(0)
    for _ in range(300):
        cx, cy, r = int(rng.integers(300, 3700)), int(rng.integers(300, 2700)), int(rng.integers(5, 40))
        noisy[cy - r : cy + r, cx - r : cx + r] ^= True
    return {"smooth ellipse": ellipse, "ellipse + 300 holes": noisy}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    rows: list[tuple[str, str, float, str]] = []
    for name, bitmap in make_masks().items():
        m = RegionMask.from_full(bitmap)
        rle = cvat_rle(m)
        coco = coco_rle(m)
        cases: list[tuple[str, Callable[[], Any], str]] = [
            ("tight", m.tight, ""),
            ("cvat_rle", lambda m=m: cvat_rle(m), f"{len(rle) - 4} runs"),
            ("cvat_rle_decode", lambda rle=rle: cvat_rle_decode(rle, W, H), ""),
            ("coco_rle", lambda m=m: coco_rle(m), f"{len(coco['counts'])} chars"),
            ("coco_rle_decode", lambda coco=coco: coco_rle_decode(coco), ""),
            ("polygons tol=1", lambda m=m: polygons(m, 1.0), f"{len(polygons(m, 1.0)[0]) // 2} vertices"),
            ("polygons tol=0", lambda m=m: polygons(m, 0), f"{len(polygons(m, 0)[0]) // 2} vertices"),
            ("cvat_detector_mask", lambda m=m: cvat_detector_mask(m), "12M-int JSON list"),
        ]
        for op, fn, note in cases:
            reps = max(1, repeats // 5) if op == "cvat_detector_mask" else repeats
            rows.append((name, op, median_ms(fn, reps), note))
    print(f"{W}x{H} mask, median of {repeats} runs")
    print(f"{'mask':<22} {'operation':<20} {'ms':>9}  note")
    for name, op, ms, note in rows:
        print(f"{name:<22} {op:<20} {ms:9.2f}  {note}")


if __name__ == "__main__":
    main()
