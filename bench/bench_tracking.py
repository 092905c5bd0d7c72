"""Per-frame latency of the single-object trackers on 1080p frames, and their memory over a long video.

    python bench/bench_tracking.py [--frames 60] [--long 3000] [--device cpu|cuda]

Frames come from tests/synthetic_video.py scaled to 1920x1080 (three objects, an occluder, one leaving). SAM
propagation uses MobileSAM with seeded random weights (the compute is real; the masks are not meaningful), so
its "new frame" time is one image encode plus one decode, and "revisited frame" is the decode alone. Prints a
markdown table and writes bench/out/tracking.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.box_tracker import MedianFlowTracker  # noqa: E402
from models.sam import SamSegmenter, build_sam  # noqa: E402
from models.sam_tracker import SamPropagationTracker  # noqa: E402
from models.shapes import Shape  # noqa: E402
from models.tracker import Frame  # noqa: E402
from tests.synthetic_video import SyntheticVideo  # noqa: E402


def per_frame_ms(tracker, video: SyntheticVideo, frames: int, object_index: int = 1) -> list[float]:  # noqa: ANN001
    image, truth = video.frame(0)
    state = tracker.init(Frame(image, "f0"), Shape("box", box=truth[object_index]))
    times = []
    for t in range(1, frames):
        image, _ = video.frame(t)
        start = time.perf_counter()
        tracker.step(state, Frame(image, f"f{t}"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--long", type=int, default=3000, help="frames of the memory run (Median Flow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    video = SyntheticVideo(width=1920, height=1080, frames=args.frames)
    rows: dict[str, float] = {}

    flow = per_frame_ms(MedianFlowTracker(), video, args.frames)
    rows["medianflow"] = statistics.median(flow)

    torch.manual_seed(0)
    sam = build_sam("mobile_sam", None)
    segmenter = SamSegmenter("mobile_sam", "mobile_sam", sam, torch.device(args.device),
                             encoder_autocast=torch.float16)  # fmt: skip
    cache: dict[str, object] = {}

    def embed(frame: Frame):  # noqa: ANN202
        if frame.content_id not in cache:
            cache[frame.content_id] = segmenter.encode(frame.image)
        return cache[frame.content_id]

    sam = SamPropagationTracker(segmenter, embed)
    sam_frames = min(args.frames, 20)
    rows["mobile_sam-propagate, new frame"] = statistics.median(per_frame_ms(sam, video, sam_frames))
    rows["mobile_sam-propagate, revisited frame"] = statistics.median(per_frame_ms(sam, video, sam_frames))

    # Memory: a long run at 1080p; the state is one grey frame and two small templates, whatever the length.
    long_video = SyntheticVideo(width=1920, height=1080, frames=args.long, loop=200)
    tracker = MedianFlowTracker()
    image, truth = long_video.frame(0)
    state = tracker.init(Frame(image, "0"), Shape("box", box=truth[1]))
    rss = []
    for t in range(1, args.long):
        tracker.step(state, Frame(long_video.frame(t)[0], str(t)))
        if t % 500 == 0:
            rss.append((t, psutil.Process().memory_info().rss // 2**20, tracker.state_bytes(state)))

    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    out = {"per_frame_ms_p50": rows, "rss": rss, "device": device}
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "tracking.json").write_text(json.dumps(out, indent=1))
    print(f"\n1920x1080 frames, {device}; median per frame and object.\n")
    print("| tracker | ms per frame |")
    print("|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} |")
    print("\nMedian Flow over a long video (frame, RSS MiB, state bytes):", rss)


if __name__ == "__main__":
    main()
