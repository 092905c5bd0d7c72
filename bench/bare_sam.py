"""The reference side of every SAM benchmark: segment-anything's SamPredictor in a bare process.

    python bench/bare_sam.py IMAGE --point X Y [--model mobile_sam] [--cold 3] [--clicks 30]

Imports nothing of labelserve's, so its allocator, threads and environment are what a user's own script
gets. Benchmarks start it through `bench.common.bare_reference`, which also strips what the benchmark's own
process may have set (ultralytics sets OMP_NUM_THREADS=1 on import; LD_PRELOAD; malloc tunables). Builds the
model from the same seed as `labelserve serve --random-init` (LABELSERVE_RANDOM_SEED, 0), so both sides hold
identical weights. Prints one JSON object of wall times in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from PIL import Image


def build(model: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if model == "mobile_sam":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mobile_sam import sam_model_registry
        return sam_model_registry["vit_t"](checkpoint=None).eval()
    from segment_anything import sam_model_registry

    return sam_model_registry[model.removeprefix("sam_")](checkpoint=None).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image")
    parser.add_argument("--point", type=float, nargs=2, required=True)
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=30)
    args = parser.parse_args()

    from segment_anything import SamPredictor

    sam = build(args.model, args.seed)
    predictor = SamPredictor(sam)
    image = np.asarray(Image.open(args.image).convert("RGB"))
    point, label = np.array([args.point]), np.array([1])
    out: dict[str, list[float]] = {
        "set_image": [],
        "predict": [],
        "floor": [],
        "threads": [torch.get_num_threads()],
    }
    with torch.inference_mode():
        for _ in range(args.cold):
            start = time.perf_counter()
            predictor.set_image(image)
            out["set_image"].append((time.perf_counter() - start) * 1000)
        predictor.predict(point, label, multimask_output=True)  # warm-up, as the server's first click is
        for _ in range(args.clicks):
            start = time.perf_counter()
            predictor.predict(point, label, multimask_output=True)
            out["predict"].append((time.perf_counter() - start) * 1000)
        # The floor: prompt encoder and mask decoder alone on the cached features, no pre- or post-processing.
        coords = predictor.transform.apply_coords(point.astype(np.float32), predictor.original_size)
        points = (torch.as_tensor(coords)[None], torch.ones(1, 1, dtype=torch.int))
        for _ in range(args.clicks):
            start = time.perf_counter()
            sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
            sam.mask_decoder(
                image_embeddings=predictor.features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            out["floor"].append((time.perf_counter() - start) * 1000)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
