"""A simulated annotator on a CVAT job: how often the first click on a frame finds its embedding ready, and
how long the first mask takes, with and without the CVAT webhook.

    python bench/bench_annotator.py [--frames 200] [--dwell 3 10] [--clicks 1 5] [--seed 0]

The job's frames (810x1080 JPEGs: bus.jpg with a unique stamp) sit in moto's S3 behind a CVAT manifest; the
CVAT emulator's task uses that bucket as its cloud storage (tests/cvat_bucket.py). The annotator opens the
job as soon as it is assigned, then for each frame in order: spends a dwell drawn uniformly from --dwell
seconds, making 1 to 5 clicks spread over it (each adds a point), through CVAT's Nuclio interactor call
(the frame's original bytes in every call, as CVAT sends them). The same seed gives both runs the same
dwell times and clicks. A first click is "warm" when its embedding was ready when it arrived (Server-Timing:
no encode, and under 50 ms waiting for the embedding). Prints a table; writes bench/out/annotator.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_memory import stamped_jpeg  # noqa: E402
from bench.common import report  # noqa: E402
from tests.conftest import ultralytics_asset  # noqa: E402
from tests.cvat_bucket import cvat_bucket  # noqa: E402

WARM_WAIT_MS = 50.0


def stages(header: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            found[name] = found.get(name, 0.0) + float(duration)
    return found


def schedule(
    frames: int, dwell: tuple[float, float], clicks: tuple[int, int], seed: int
) -> list[list[float]]:
    """Per frame, the times (s after opening it) of its clicks; the last is when the annotator moves on."""
    rng = random.Random(seed)
    plan = []
    for _ in range(frames):
        stay = rng.uniform(*dwell)
        count = rng.randint(*clicks)
        times = sorted(rng.uniform(0.3, stay * 0.9) for _ in range(count))
        plan.append([*times, stay])
    return plan


def annotate(world, plan: list[list[float]], size: tuple[int, int], assign: bool) -> dict:
    width, height = size
    job = world.task.jobs[0]
    if assign:  # CVAT: a lead assigns the job; the webhook reaches labelserve
        world.cvat.update_job(job.id, assignee="annotator", state="in progress")
    rng = random.Random(1)
    first_ms, warm, later_ms = [], [], []
    for frame, times in enumerate(plan):
        opened = time.monotonic()
        points: list[list[float]] = []
        for n, at in enumerate(times[:-1]):
            time.sleep(max(0.0, opened + at - time.monotonic()))
            points.append([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
            start = time.perf_counter()
            reply = world.nuclio_click(frame, points)
            elapsed = (time.perf_counter() - start) * 1000
            reply.raise_for_status()
            if n == 0:
                timing = stages(reply.headers.get("server-timing", ""))
                first_ms.append(elapsed)
                warm.append("encode" not in timing and timing.get("embedding", 0.0) < WARM_WAIT_MS)
            else:
                later_ms.append(elapsed)
        time.sleep(max(0.0, opened + times[-1] - time.monotonic()))
    return {"first_ms": first_ms, "warm": warm, "later_ms": later_ms}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--dwell", type=float, nargs=2, default=[3.0, 10.0])
    parser.add_argument("--clicks", type=int, nargs=2, default=[1, 5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = np.asarray(Image.open(ultralytics_asset("bus.jpg")).convert("RGB"))
    frames = [stamped_jpeg(base, 50_000 + i) for i in range(args.frames)]
    plan = schedule(args.frames, tuple(args.dwell), tuple(args.clicks), args.seed)
    results: dict = {"frames": args.frames, "dwell_s": args.dwell, "clicks": args.clicks, "runs": {}}
    for name, webhook in (("without the webhook", False), ("with the webhook", True)):
        with cvat_bucket(frames, args.frames, webhook=webhook) as world:
            results["runs"][name] = annotate(world, plan, (base.shape[1], base.shape[0]), assign=webhook)
        print(f"{name}: done", flush=True)
    report("annotator", results, {"bench_annotator": render(results)})


def render(results: dict) -> str:
    lines = [
        "| run | first clicks served warm | time to first mask p50 / p95 | later clicks p50 |",
        "|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        first, later = run["first_ms"], run["later_ms"] or [float("nan")]
        warm, total = sum(run["warm"]), len(run["warm"])
        lines.append(
            f"| {name} | {100 * warm / total:.1f} % ({warm}/{total}) "
            f"| {statistics.median(first):.0f} / {float(np.percentile(first, 95)):.0f} ms "
            f"| {statistics.median(later):.0f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
