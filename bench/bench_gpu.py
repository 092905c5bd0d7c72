"""SAM on a GPU: encoder precision and batching, and clicks, against segment-anything's SamPredictor, one run.

    python bench/bench_gpu.py [--models sam_vit_h,sam_vit_b,mobile_sam] [--repeat 20] [--batches 1,2,4,8]

Every model is built with seeded random weights (real compute; no checkpoint is obtainable here). The
reference is `SamPredictor` in float32, as its README runs it; labelserve's encoder runs under autocast
(LABELSERVE_ENCODER_DTYPE). Times are medians with the device synchronised. Prints markdown tables and writes
bench/out/gpu.json. Meant for CUDA; on a CPU it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.base import Prompt  # noqa: E402
from models.sam import SamSegmenter, build_sam  # noqa: E402
from tests.conftest import synthetic_scene  # noqa: E402

# CUDA unless absent: a CPU run only checks that the script works.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def encoder_rows(name: str, image: np.ndarray, repeat: int) -> list[dict]:
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    sam = build_sam(name, None).to(DEVICE)
    predictor = SamPredictor(sam)
    reference_ms = median_ms(lambda: predictor.set_image(image), repeat)
    predictor.set_image(image)
    reference = predictor.features.float()
    height, width = image.shape[:2]
    click = np.array([[width / 2, height / 2]], np.float32)
    ref_masks, _, _ = predictor.predict(click, np.array([1]), multimask_output=False)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        segmenter = SamSegmenter(name, name, sam, torch.device(DEVICE), encoder_autocast=dtype)
        ms = median_ms(lambda s=segmenter: s.encode(image), repeat)
        embedding = segmenter.encode(image)
        features = embedding["image_embed"].to(DEVICE).float()
        error = float((features - reference).norm() / reference.norm())
        decoded = segmenter.decode(embedding, Prompt(points=click, labels=np.array([1])), multimask=False)
        mask = segmenter.upsample(embedding, decoded.low_res_logits[0]).to_full()
        rows.append({
            "model": name, "encoder": dtype_name, "ms": ms, "reference_ms": reference_ms,
            "speedup": reference_ms / ms, "rel_error": error, "mask_iou": iou(mask, ref_masks[0]),
        })  # fmt: skip
    return rows


def batch_rows(name: str, batches: list[int], repeat: int, dtype: torch.dtype | None) -> list[dict]:
    """Per-image encoder time when B preprocessed images share one forward pass (encoder micro-batching)."""
    torch.manual_seed(0)
    encoder = build_sam(name, None).to(DEVICE).image_encoder
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 1024, 1024, device=DEVICE)

        def run(x: torch.Tensor = x) -> None:
            autocast = torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None)
            with torch.inference_mode(), autocast:
                encoder(x)

        try:
            ms = median_ms(run, max(repeat // 2, 5))
        except torch.OutOfMemoryError:
            break
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
        rows.append({"model": name, "batch": batch, "ms": ms, "ms_per_image": ms / batch, "peak_gib": peak})
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
    return rows


def click_rows(name: str, images: dict[str, np.ndarray], repeat: int) -> list[dict]:
    """Warm clicks: prompt → mask at full resolution, from an already computed embedding."""
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    sam = build_sam(name, None).to(DEVICE)
    predictor = SamPredictor(sam)
    segmenter = SamSegmenter(name, name, sam, torch.device(DEVICE), encoder_autocast=torch.float16)
    rows = []
    for label, image in images.items():
        height, width = image.shape[:2]
        click = np.array([[width * 0.4, height * 0.55]], np.float32)
        predictor.set_image(image)
        embedding = segmenter.encode(image)
        prompt = Prompt(points=click, labels=np.array([1]))

        def ours(embedding=embedding, prompt=prompt) -> None:  # noqa: ANN001
            decoded = segmenter.decode(embedding, prompt, multimask=False)
            segmenter.upsample(embedding, decoded.low_res_logits[0])

        def theirs(click: np.ndarray = click) -> None:
            predictor.predict(click, np.array([1]), multimask_output=False)

        ref_ms, ms = median_ms(theirs, repeat), median_ms(ours, repeat)
        rows.append({"model": name, "image": label, "ms": ms, "reference_ms": ref_ms, "speedup": ref_ms / ms})
    return rows


def scheduler_rows(name: str, image: np.ndarray, clients: int, batches: list[int]) -> list[dict]:
    """The server's embedding path (TieredEmbeddings: the resize on each request's thread, then the model's
    encode scheduler): `clients` first clicks on distinct images arriving together, batched or one by one."""
    import itertools
    import threading

    from server.ops.timing import Timings
    from server.services.embeddings import TieredEmbeddings
    from server.services.embeddings.scheduler import Priority
    from server.settings import Settings

    torch.manual_seed(0)
    segmenter = SamSegmenter(name, name, build_sam(name, None).to(DEVICE), torch.device(DEVICE),
                             encoder_autocast=torch.float16)  # fmt: skip
    segmenter.warm_up(max(batches))  # as the registry does when it loads a model on CUDA
    ids = itertools.count()  # a new image id for every request: no cache hit, no shared encode
    rows = []
    for batch in batches:
        embeddings = TieredEmbeddings(Settings(encode_max_batch=batch, encode_max_wait_ms=2.0), l2=None)

        def embed(embeddings: TieredEmbeddings = embeddings) -> None:
            embeddings.get_or_encode(
                segmenter, f"{name}-{next(ids)}", b"", Timings(), Priority.INTERACTIVE, decoded=image
            )

        def together(waits: list[float]) -> None:
            def one() -> None:
                began = time.perf_counter()
                embed()
                waits.append((time.perf_counter() - began) * 1000)

            threads = [threading.Thread(target=one) for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        for _ in range(2):  # warm-up of this batch shape
            together([])
        waits: list[float] = []
        start = time.perf_counter()
        together(waits)
        total = (time.perf_counter() - start) * 1000
        alone = median_ms(embed, 10)
        rows.append({"model": name, "max_batch": batch, "clients": clients, "total_ms": total,
                     "images_per_s": clients / total * 1000, "p50_wait_ms": statistics.median(waits),
                     "max_wait_ms": max(waits), "single_ms": alone})  # fmt: skip
        embeddings.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="sam_vit_h,sam_vit_b,mobile_sam")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--sections", default="encoder,batch,click,scheduler")
    parser.add_argument("--clients", type=int, default=16, help="simultaneous first clicks (scheduler)")
    parser.add_argument("--sizes", default="1920x1080,4000x3000", help="click images, WxH")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's float32 stays float32
    names = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    images = {f"{w}×{h}": synthetic_scene(w, h) for w, h in sizes}
    hd = next(iter(images.values()))
    results: dict[str, list] = {"encoder": [], "batch": [], "click": [], "scheduler": []}
    for name in names:
        if "encoder" in args.sections:
            results["encoder"] += encoder_rows(name, hd, args.repeat)
        if "batch" in args.sections:
            results["batch"] += batch_rows(name, batches, args.repeat, torch.float16)
        if "click" in args.sections:
            results["click"] += click_rows(name, images, args.repeat * 2)
        if "scheduler" in args.sections:
            results["scheduler"] += scheduler_rows(name, hd, args.clients, [1, 4, 8])
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run)"
    results["device"] = gpu
    results["torch"] = torch.__version__
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "gpu.json").write_text(json.dumps(results, indent=1))

    print(f"\n{gpu}, torch {torch.__version__}; seeded random weights; medians.\n")
    print(
        f"Encoder, {next(iter(images))} image (resize + normalise + ViT), against SamPredictor.set_image "
        "in float32:\n"
    )
    print("| model | labelserve encoder | ms | SamPredictor fp32 ms | speed-up | embedding rel. error | "
          "mask IoU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results["encoder"]:
        mode = r["encoder"] if r["encoder"] == "float32" else f"{r['encoder']} autocast"
        print(f"| {r['model']} | {mode} | {r['ms']:.1f} | {r['reference_ms']:.1f} | "
              f"**{r['speedup']:.2f}×** | {r['rel_error']:.1e} | {r['mask_iou']:.4f} |")  # fmt: skip
    print("\nEncoder batching (fp16 autocast, the ViT alone on 1024×1024 inputs):\n")
    print("| model | batch | ms per batch | ms per image | gain per image vs batch 1 | peak GiB |")
    print("|---|---|---|---|---|---|")
    single = {r["model"]: r["ms_per_image"] for r in results["batch"] if r["batch"] == 1}
    for r in results["batch"]:
        print(f"| {r['model']} | {r['batch']} | {r['ms']:.1f} | {r['ms_per_image']:.1f} | "
              f"{single[r['model']] / r['ms_per_image']:.2f}× | {r['peak_gib']:.1f} |")  # fmt: skip
    print(f"\nEncode scheduler, {args.clients} first clicks at once (1080p), batched vs one by one:\n")
    print("| model | max batch | all done | images/s | p50 wait | max wait | one click alone |")
    print("|---|---|---|---|---|---|---|")
    for r in results["scheduler"]:
        print(f"| {r['model']} | {r['max_batch']} | {r['total_ms']:.0f} ms | {r['images_per_s']:.1f} | "
              f"{r['p50_wait_ms']:.0f} ms | {r['max_wait_ms']:.0f} ms | "
              f"{r['single_ms']:.1f} ms |")  # fmt: skip
    print("\nWarm click (prompt → full-resolution mask), against SamPredictor.predict:\n")
    print("| model | image | labelserve ms | SamPredictor ms | speed-up |")
    print("|---|---|---|---|---|")
    for r in results["click"]:
        print(f"| {r['model']} | {r['image']} | {r['ms']:.2f} | {r['reference_ms']:.2f} | "
              f"**{r['speedup']:.2f}×** |")  # fmt: skip


if __name__ == "__main__":
    main()
