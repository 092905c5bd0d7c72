"""SAM 2 tracker: per-frame latency and process memory over a long synthetic 1080p video.

    python bench/bench_sam2_tracker.py [--frames 40] [--model sam2.1_hiera_tiny] [--image-size 1024]
                                       [--device cpu] [--threads 0]

Two objects are tracked on every frame, as CVAT asks for each object of a frame in turn: the first object's
step includes the image encoder, the second's reuses the tracker's features of that frame (memory attention,
mask decoder and memory encoder only). Seeded random weights (real compute; no checkpoint is obtainable
here). RSS and the states' bytes are sampled after every frame: both stay flat once the memory bank is full.
Prints a markdown table and writes bench/out/sam2_tracker.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.sam2_tracker import Sam2Tracker, build_sam2  # noqa: E402
from models.shapes import Shape  # noqa: E402
from models.tracker import Frame  # noqa: E402
from tests.synthetic_video import SyntheticVideo  # noqa: E402


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--image-size", type=int, default=1024, help="the model's input size (SAM 2: 1024)")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    started = time.perf_counter()
    tracker = Sam2Tracker(args.model, build_sam2(args.model, None, device, image_size=args.image_size))
    build_s = time.perf_counter() - started
    # loop: objects wrap around, so they stay in view however long the video is
    video = SyntheticVideo(width=args.width, height=args.height, frames=args.frames, loop=120)
    image, boxes = video.frame(0)
    first = Frame(image, "frame-0")
    started = time.perf_counter()
    states = [tracker.init(first, Shape("box", box=boxes[i])) for i in (0, 1)]
    init_s = time.perf_counter() - started

    # CPU seconds too: on a shared machine wall time also counts other processes' turns.
    encoded_ms, cached_ms, encoded_cpu, cached_cpu, rss, state_bytes, found = [], [], [], [], [], [], 0
    for t in range(1, args.frames):
        frame = Frame(video.frame(t)[0], f"frame-{t}")
        for index, state in enumerate(states):
            started, cpu = time.perf_counter(), time.process_time()
            result = tracker.step(state, frame)
            (encoded_ms if index == 0 else cached_ms).append((time.perf_counter() - started) * 1000)
            (encoded_cpu if index == 0 else cached_cpu).append(time.process_time() - cpu)
            found += result is not None
        rss.append(rss_mib())
        state_bytes.append(sum(tracker.state_bytes(s) for s in states))
        print(
            f"frame {t}: {encoded_ms[-1]:.0f} + {cached_ms[-1]:.0f} ms, "
            f"{encoded_cpu[-1]:.1f} + {cached_cpu[-1]:.1f} CPU s, RSS {rss[-1]:.0f} MiB, "
            f"states {state_bytes[-1]} B",
            flush=True,
        )

    steady = slice(min(10, len(rss) - 1), None)  # after warm-up and a full memory bank
    result = {
        "model": args.model,
        "image_size": args.image_size,
        "frame": f"{args.width}x{args.height}",
        "frames": args.frames,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "build_s": round(build_s, 2),
        "init_two_objects_s": round(init_s, 2),
        "step_with_encoder_ms": {
            "median": round(statistics.median(encoded_ms)),
            "p90": round(float(np.percentile(encoded_ms, 90))),
        },
        "step_cached_frame_ms": {
            "median": round(statistics.median(cached_ms)),
            "p90": round(float(np.percentile(cached_ms, 90))),
        },
        "cpu_s_median": {
            "step_with_encoder": round(statistics.median(encoded_cpu), 2),
            "step_cached_frame": round(statistics.median(cached_cpu), 2),
        },
        "load_average_1min": round(psutil.getloadavg()[0], 1),
        "rss_mib": {
            "after_frame_1": round(rss[0]),
            "after_frame_10": round(rss[min(9, len(rss) - 1)]),
            "last": round(rss[-1]),
            "steady_max_minus_min": round(max(rss[steady]) - min(rss[steady]), 1),
        },
        "two_states_bytes": {"after_frame_10": state_bytes[min(9, len(rss) - 1)], "last": state_bytes[-1]},
        "masks_found": f"{found}/{2 * (args.frames - 1)} (random weights: masks are meaningless)",
    }
    encoded, cached = result["step_with_encoder_ms"], result["step_cached_frame_ms"]
    print(
        f"| SAM 2 tracker ({args.model}, input {args.image_size}, {args.width}x{args.height}, "
        f"{torch.get_num_threads()} threads) | median | p90 |\n| --- | --- | --- |\n"
        f"| step, first object on a frame (with encoder) | {encoded['median']} ms | {encoded['p90']} ms |\n"
        f"| step, another object on the same frame | {cached['median']} ms | {cached['p90']} ms |"
    )
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "sam2_tracker.json").write_text(json.dumps({**result, "rss_per_frame_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
