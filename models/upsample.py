"""Bilinear upsampling of mask logits to the original image, computed only where the mask can be positive.

`upsample_region(source, H, W)` equals `F.interpolate(source, (H, W), mode="bilinear",
align_corners=False) > threshold` (the last step of SAM's and SAM 2's post-processing), but it interpolates
only the output pixels that have a positive source pixel among their bilinear neighbours: every other output
pixel is a mix of non-positive values, hence background. That is what makes a click on a 12 MP image cheap.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.shapes import RegionMask

# cv2.warpAffine cannot write images wider or taller than this.
CV2_MAX_SIDE = 32766


def region_of(positive: torch.Tensor) -> RegionMask:
    """A boolean [H, W] tensor, on any device, as a RegionMask: only its bounding box is copied to the host.
    The GPU path of every model's post-processing, where a full-resolution resize costs next to nothing."""
    height, width = positive.shape
    rows = positive.any(dim=1).nonzero()
    if rows.numel() == 0:
        return RegionMask.empty(width, height)
    cols = positive.any(dim=0).nonzero()
    r0, r1, c0, c1 = (int(v) for v in (rows[0], rows[-1], cols[0], cols[-1]))
    return RegionMask(positive[r0 : r1 + 1, c0 : c1 + 1].cpu().numpy(), c0, r0, width, height)


def upsample_region(source: np.ndarray, height: int, width: int, threshold: float) -> RegionMask:
    """`source`: float32 [h, w] logits; the binary mask of their bilinear resize to (height, width)."""
    src_h, src_w = source.shape
    positive = source > threshold
    rows = np.flatnonzero(positive.any(axis=1))
    if rows.size == 0:
        return RegionMask(np.zeros((0, 0), bool), 0, 0, width, height)
    cols = np.flatnonzero(positive.any(axis=0))
    sy, sx = src_h / height, src_w / width
    r0, r1 = output_span(rows[0], rows[-1], sy, height)
    c0, c1 = output_span(cols[0], cols[-1], sx, width)
    if (r1 - r0) * (c1 - c0) > 0.5 * height * width and max(height, width) <= CV2_MAX_SIDE:
        # A mask spanning most of the frame: cv2.resize samples at the same points and is faster.
        full = cv2.resize(source, (width, height), interpolation=cv2.INTER_LINEAR)
        return RegionMask(full > threshold, 0, 0, width, height)
    if max(r1 - r0, c1 - c0) > CV2_MAX_SIDE:
        full = F.interpolate(
            torch.from_numpy(source)[None, None], (height, width), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        return RegionMask(full > threshold, 0, 0, width, height)
    # Output pixel (x, y) samples the source at ((x + 0.5) * s - 0.5), the same half-pixel convention
    # as torch's align_corners=False; border replication equals torch's clamping.
    affine = np.array([[sx, 0.0, sx * (c0 + 0.5) - 0.5], [0.0, sy, sy * (r0 + 0.5) - 0.5]], dtype=np.float64)
    region = cv2.warpAffine(
        source,
        affine,
        (c1 - c0, r1 - r0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return RegionMask(region > threshold, c0, r0, width, height)


def output_span(first: int, last: int, scale: float, limit: int) -> tuple[int, int]:
    """Output pixels [start, stop) whose bilinear neighbours can include source pixels first..last."""
    start = int(np.floor((first - 0.5) / scale - 0.5)) - 1
    stop = int(np.ceil((last + 1.5) / scale - 0.5)) + 2
    return max(start, 0), min(stop, limit)
