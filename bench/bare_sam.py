"""The reference side of every SAM benchmark: segment-anything's SamPredictor (or, for a SAM 2 model such as
`sam2.1_hiera_tiny`, sam2's SAM2ImagePredictor) in a bare process.

    python bench/bare_sam.py IMAGE --point X Y [--model mobile_sam] [--cold 3] [--clicks 30] [--serve]

Imports nothing of labelserve's, so its allocator, threads and environment are what a user's own script gets.
Benchmarks start it through `bench.common.bare_reference` or `BareReference` (--serve), which strip what the
benchmark's own process may have set (ultralytics sets OMP_NUM_THREADS=1 on import; LD_PRELOAD; malloc
tunables). Builds the model from the same seed as `labelserve serve --random-init` (LABELSERVE_RANDOM_SEED,
0), so both sides hold identical weights. Prints one JSON object of wall times in milliseconds. With --serve
it holds the model and the image and times what stdin asks, so a benchmark can alternate it with the server's
requests.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    parser.add_argument(
        "--serve",
        action="store_true",
        help="after building the model, time what stdin asks, one line at a time: `set_image N`, `predict N` "
        "or `floor N`; one JSON list of wall ms per line (bench.common.BareReference interleaves these "
        "with the server's requests, so both sides see the host in the same state)",
    )
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
    if args.serve:
        with torch.inference_mode():
            predictor.set_image(image)  # the floor decoder reads the features of a set image
            serve(predictor, image, point, label, floor_decoder(args.model, sam, predictor, point))
        return
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


def serve(predictor, image: np.ndarray, point: np.ndarray, label: np.ndarray, decode) -> None:
    """Answer `set_image N`, `predict N` and `floor N` lines on stdin with N wall times (ms), until EOF."""
    with torch.inference_mode():
        predictor.predict(point, label, multimask_output=True)  # warm-up, as the server's first click is
        runs = {
            "set_image": lambda: predictor.set_image(image),
            "predict": lambda: predictor.predict(point, label, multimask_output=True),
            "floor": decode,
        }
        print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            what, count = line.split()
            times = []
            for _ in range(int(count)):
                start = time.perf_counter()
                runs[what]()
                times.append((time.perf_counter() - start) * 1000)
            print(json.dumps(times), flush=True)


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
