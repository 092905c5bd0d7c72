"""Memory policy candidates: what each costs per click and per embed, and whether it keeps RSS bounded.

    python bench/bench_memory.py [--candidates NAME ...] [--images 120 500] [--caps 64 256] [--clicks 30]

For every candidate allocator (LABELSERVE_ALLOCATOR, plus the environment a candidate adds) it starts
`labelserve serve --random-init` with MobileSAM and measures, over HTTP on loopback:
- latency: cold embed of bus.jpg (the L1 cache cleared before each) and a warm click on it, p50;
- memory: RSS after the first image, then after each checkpoint of distinct 810x1080 JPEGs (bus.jpg with a
  unique stamp), once per L1 cache cap.
The reference is segment-anything's SamPredictor in a bare process (bench/bare_sam.py), run right before each
candidate's latency phase. Prints one markdown table and writes bench/out/memory.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_sam import cold_embeds, warm_clicks  # noqa: E402
from bench.common import ROOT, SamServer, bare_reference, report  # noqa: E402
from tests.conftest import ultralytics_asset  # noqa: E402

MODEL = "mobile_sam"
CANDIDATES: dict[str, dict[str, str]] = {
    "glibc-defaults": {"LABELSERVE_ALLOCATOR": "untuned"},
    "glibc-pin-1mib": {"LABELSERVE_ALLOCATOR": "untuned", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    "glibc-tuned": {"LABELSERVE_ALLOCATOR": "glibc"},
    "glibc-tuned-arena2": {"LABELSERVE_ALLOCATOR": "glibc", "MALLOC_ARENA_MAX": "2"},
    "glibc-tuned-trim2s": {"LABELSERVE_ALLOCATOR": "glibc", "LABELSERVE_MEMORY_TRIM_S": "2"},
    "jemalloc": {"LABELSERVE_ALLOCATOR": "jemalloc", "MALLOC_CONF": ""},  # "": jemalloc's own defaults
    "jemalloc-nodecay": {
        "LABELSERVE_ALLOCATOR": "jemalloc",
        "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
    },
    "jemalloc-labelserve": {"LABELSERVE_ALLOCATOR": "auto"},  # the default: ops/allocator.JEMALLOC_CONF
    "tcmalloc": {"LABELSERVE_ALLOCATOR": "tcmalloc"},
}
DESCRIPTIONS = {
    "glibc-defaults": "glibc as it comes",
    "glibc-pin-1mib": "glibc, mmap threshold pinned at 1 MiB (the policy before #11)",
    "glibc-tuned": "glibc, mmap threshold 32 MiB + trim threshold 512 MiB (`LABELSERVE_ALLOCATOR=glibc`)",
    "glibc-tuned-arena2": "the same + `MALLOC_ARENA_MAX=2`",
    "glibc-tuned-trim2s": "glibc tuned + `malloc_trim(0)` every 2 s on its own thread (`MEMORY_TRIM_S=2`)",
    "jemalloc": "jemalloc 5.3 (libjemalloc2), defaults",
    "jemalloc-nodecay": "jemalloc, `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`",
    "jemalloc-labelserve": "**the default**: the same + `narenas:2` (`LABELSERVE_ALLOCATOR=auto`)",
    "tcmalloc": "tcmalloc (libtcmalloc-minimal4), defaults",
}


def stamped_jpeg(base: np.ndarray, index: int) -> bytes:
    """bus.jpg with a unique 8x8-cell stamp: distinct bytes and pixels, the same size and decode cost."""
    image = base.copy()
    for bit in range(20):
        image[8 * bit : 8 * bit + 8, :8] = 255 if index >> bit & 1 else 0
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def latency(server: SamServer, bus: bytes, point: list[float], cold: int, clicks: int) -> dict:
    embeds, _, image_id = cold_embeds(server, MODEL, bus, cold)
    return {"embed_ms": embeds, "click_ms": warm_clicks(server, MODEL, image_id, point, clicks)[0]}


def rss_series(server: SamServer, base: np.ndarray, checkpoints: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for index in range(max(checkpoints)):
        data = stamped_jpeg(base, index)
        server.http.post(
            f"/v1/sam/{MODEL}/embed", content=data, headers={"content-type": "image/jpeg"}
        ).raise_for_status()
        if index + 1 == 1 or index + 1 in checkpoints or (index + 1) % 50 == 0:
            out[str(index + 1)] = round(server.rss_mib(), 1)
    return out


def run_candidate(
    name: str, args: argparse.Namespace, bus: bytes, base: np.ndarray, point: list[float]
) -> dict:
    env = CANDIDATES[name]
    result: dict = {"env": env}
    if args.clicks:
        # The reference right before each candidate's latency: both see the machine in the same state.
        result["reference"] = bare_reference(
            ultralytics_asset("bus.jpg"), point, cold=args.cold, clicks=args.clicks
        )
        with SamServer(MODEL, **env) as server:
            result["allocator"] = server.allocator()
            result.update(latency(server, bus, point, args.cold, args.clicks))
    for cap in args.caps:
        with SamServer(MODEL, LABELSERVE_CACHE_BYTES=str(cap * 2**20), **env) as server:
            result.setdefault("allocator", server.allocator())
            result[f"rss_cap{cap}"] = rss_series(server, base, args.images)
        print(f"  {name}, cap {cap} MiB: {result[f'rss_cap{cap}']}", flush=True)
    return result


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--images", type=int, nargs="+", default=[120, 500])
    parser.add_argument("--caps", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=30, help="0 skips the latency phase")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add to bench/out/memory.json instead of replacing it (a latency run and an RSS run, one table)",
    )
    args = parser.parse_args()

    bus = ultralytics_asset("bus.jpg").read_bytes()
    base = np.asarray(Image.open(ultralytics_asset("bus.jpg")).convert("RGB"))
    point = [base.shape[1] * 0.45, base.shape[0] * 0.6]
    results: dict = {
        "machine": f"{os.cpu_count()} cores",
        "images": args.images,
        "caps": args.caps,
        "candidates": {},
    }
    saved = ROOT / "bench" / "out" / "memory.json"
    if args.merge and saved.exists():
        results = json.loads(saved.read_text())
        results["caps"] = sorted(set(results["caps"]) | set(args.caps))
        results["images"] = sorted(set(results["images"]) | set(args.images))
    for name in args.candidates:
        print(f"{name} ...", flush=True)
        results["candidates"].setdefault(name, {}).update(run_candidate(name, args, bus, base, point))
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))  # after each candidate: hours of work are not lost
    report("memory", results, {"bench_memory": render(results)})


def render(results: dict) -> str:
    med = statistics.median
    caps, images = results["caps"], results["images"]
    heads = " | ".join(
        f"RSS, {cap} MiB cap: first → {' → '.join(map(str, images))} images (growth)" for cap in caps
    )
    lines = [
        f"| allocator | warm click p50 / bare predict | cold embed p50 / bare set_image | {heads} |",
        "|---|---|---|" + "---|" * len(caps),
    ]
    for name in sorted(results["candidates"], key=list(CANDIDATES).index):
        r = results["candidates"][name]
        cells = [DESCRIPTIONS[name]]
        if "click_ms" in r:
            click, embed = med(r["click_ms"]), med(r["embed_ms"])
            predict, set_image = med(r["reference"]["predict"]), med(r["reference"]["set_image"])
            cells += [
                f"{click:.0f} / {predict:.0f} ms = **{click / predict:.2f}×**",
                f"{embed:.0f} / {set_image:.0f} ms = **{embed / set_image:.2f}×**",
            ]
        else:
            cells += ["—", "—"]
        for cap in caps:
            series = r.get(f"rss_cap{cap}", {})
            first = series.get("1")
            points = [series.get(str(n)) for n in images]
            known = [(n, v) for n, v in zip(images, points, strict=True) if v]
            growth = ""
            if first and known:  # growth at the last image count measured (a short run stops at 120)
                n, last = known[-1]
                growth = f" (+{last - first:.0f}{'' if n == images[-1] else f' at {n}'}, budget +{cap + 64})"
            cells.append(" → ".join(f"{v:.0f}" if v else "?" for v in [first, *points]) + growth)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
