"""The reference side of every SAM benchmark: segment-anything's SamPredictor (or, for a SAM 2 model such as
`sam2.1_hiera_tiny`, sam2's SAM2ImagePredictor) in a bare process.

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

# SAM 2 model name -> the config inside Meta's sam2 package (as models/sam2.py SAM2_CONFIGS)
_SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def sam2_config(model: str) -> str:
    version, _, size = model.partition("_hiera_")
    return f"configs/{version}/{version}_hiera_{_SAM2_SIZES[size]}.yaml"


def build(model: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if model.startswith("sam2"):
        from sam2.build_sam import build_sam2

        return build_sam2(sam2_config(model), None, device="cpu").eval()
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

    sam = build(args.model, args.seed)
    if args.model.startswith("sam2"):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(sam)
    else:
        from segment_anything import SamPredictor

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
        decode = floor_decoder(args.model, sam, predictor, point)
        for _ in range(args.clicks):
            start = time.perf_counter()
            decode()
            out["floor"].append((time.perf_counter() - start) * 1000)
    print(json.dumps(out))


def floor_decoder(model: str, sam: torch.nn.Module, predictor, point: np.ndarray):
    """The prompt encoder and mask decoder of one positive click, as each predictor calls them."""
    if model.startswith("sam2"):
        coords = torch.as_tensor(point, dtype=torch.float)
        coords = predictor._transforms.transform_coords(coords, normalize=True, orig_hw=predictor._orig_hw[0])
        points = (coords[None], torch.ones(1, 1, dtype=torch.int))
        features = predictor._features

        def decode_sam2() -> None:
            sparse, dense = sam.sam_prompt_encoder(points=points, boxes=None, masks=None)
            sam.sam_mask_decoder(
                image_embeddings=features["image_embed"],
                image_pe=sam.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
                repeat_image=False,
                high_res_features=features["high_res_feats"],
            )

        return decode_sam2
    coords = predictor.transform.apply_coords(point.astype(np.float32), predictor.original_size)
    points = (torch.as_tensor(coords)[None], torch.ones(1, 1, dtype=torch.int))

    def decode_sam() -> None:
        sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
        sam.mask_decoder(
            image_embeddings=predictor.features,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )

    return decode_sam


if __name__ == "__main__":
    main()
