"""Choosing what to annotate next (issue #16, part 2): uncertainty first, then diversity.

- Uncertainty per image from the detections labelserve computes anyway: each box's top-class confidence p
  gives least-confidence 1 - p, margin 1 - |p - (1 - p)| (NMS keeps only the top class, so the runner-up is
  the box's "not this" mass) or the binary entropy of p; an image scores the mean over its boxes, and an
  image with no detection scores 0 (the detector saw nothing to doubt).
- Diversity: k-center greedy (Sener & Savarese, ICLR'18) over image embeddings: each pick is the image
  farthest from everything picked so far, so every region of the embedding space gets a representative.
- Together (PPAL's order): the `prefilter` × budget most uncertain images, then k-center among them.

No active-learning framework: numpy only. Deterministic for a seed (ties go to the lowest index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Uncertainty = Literal["least_confidence", "margin", "entropy"]


def image_uncertainty(confidences: Sequence[Sequence[float]], method: Uncertainty = "entropy") -> np.ndarray:
    """One score per image (higher = more uncertain) from its boxes' confidences."""
    scores = np.zeros(len(confidences), dtype=np.float64)
    for i, boxes in enumerate(confidences):
        if not len(boxes):
            continue
        p = np.clip(np.asarray(boxes, dtype=np.float64), 1e-9, 1 - 1e-9)
        if method == "least_confidence":
            per_box = 1 - p
        elif method == "margin":
            per_box = 1 - np.abs(2 * p - 1)
        else:
            per_box = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)
        scores[i] = float(per_box.mean())
    return scores


def kcenter_greedy(embeddings: np.ndarray, budget: int, seed: int = 0) -> list[int]:
    """`budget` row indices of `embeddings` [N, D], in pick order: a seeded first pick, then each time the
    row farthest (Euclidean) from all rows picked so far. ValueError when budget > N."""
    points = np.ascontiguousarray(embeddings, dtype=np.float32)
    count = len(points)
    if not 0 < budget <= count:
        raise ValueError(f"the budget ({budget}) must be between 1 and the pool's size ({count})")
    norms = np.einsum("ij,ij->i", points, points)
    first = int(np.random.default_rng(seed).integers(count))
    picked = [first]
    # Squared distances via |x|^2 - 2 x.c + |c|^2: one matrix-vector product per pick, as einsum: BLAS's
    # threads cost more to wake than a 10k x 256 product takes (12x slower measured on the 2-core CPU).
    nearest = norms - 2 * np.einsum("ij,j->i", points, points[first]) + norms[first]
    nearest[first] = -np.inf
    for _ in range(budget - 1):
        best = int(np.argmax(nearest))
        picked.append(best)
        np.minimum(nearest, norms - 2 * np.einsum("ij,j->i", points, points[best]) + norms[best], out=nearest)
        nearest[best] = -np.inf  # earlier picks stay at -inf: min(-inf, d) = -inf
    return picked


def select(
    embeddings: np.ndarray,
    uncertainty: np.ndarray,
    budget: int,
    prefilter: float = 3.0,
    seed: int = 0,
) -> list[int]:
    """Uncertainty first, then diversity: k-center greedy among the ceil(prefilter × budget) most uncertain
    images (all of them when prefilter is 0). Indices into the pool, in pick order."""
    count = len(embeddings)
    if not 0 < budget <= count:
        raise ValueError(f"the budget ({budget}) must be between 1 and the pool's size ({count})")
    keep = count if prefilter <= 0 else min(count, max(budget, int(np.ceil(prefilter * budget))))
    candidates = np.argsort(-np.asarray(uncertainty, dtype=np.float64), kind="stable")[:keep]
    candidates.sort()  # k-center's tie-breaking follows pool order, not the uncertainty ranking
    return [int(candidates[i]) for i in kcenter_greedy(embeddings[candidates], budget, seed)]
