"""Choosing what to annotate next (issue #16, part 2), by construction: on a pool of k equal clusters with a
budget of k, k-center greedy covers the clusters and random picks do not; the sampler is deterministic for a
seed; uncertainty ranks as its definitions say; and 10,000 × 256-d with a budget of 1,000 takes ≤ 10 s."""

from __future__ import annotations

import time

import numpy as np
import pytest

from server.services.sampling import image_uncertainty, kcenter_greedy, select


def clusters(k: int, per: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian clusters of `per` points each; returns (points, cluster of each point)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, dim))
    labels = np.repeat(np.arange(k), per)
    return (centres[labels] + rng.normal(0, 0.5, (k * per, dim))).astype(np.float32), labels


def test_kcenter_covers_k_equal_clusters_with_a_budget_of_k_and_random_does_not() -> None:
    coverage, random_coverage = [], []
    for seed in range(5):
        points, labels = clusters(50, 40, seed=seed)
        picked = kcenter_greedy(points, 50, seed=seed)
        coverage.append(len(set(labels[picked])) / 50)
        rng = np.random.default_rng(seed)
        random_coverage.append(len(set(labels[rng.choice(len(points), 50, replace=False)])) / 50)
    print(f"\nk-center coverage {np.mean(coverage):.3f}, random {np.mean(random_coverage):.3f}")
    assert min(coverage) >= 0.95
    assert np.mean(random_coverage) == pytest.approx(1 - (1 - 1 / 50) ** 50, abs=0.08)  # about 0.64


def test_the_sampler_is_deterministic_for_a_seed_and_picks_distinct_images() -> None:
    points, _ = clusters(20, 30, seed=3)
    uncertainty = np.random.default_rng(1).random(len(points))
    first = select(points, uncertainty, 25, seed=7)
    assert first == select(points, uncertainty, 25, seed=7)
    assert len(set(first)) == 25
    assert select(points, uncertainty, 25, seed=8) != first
    # Only the 3 × 25 most uncertain images are candidates.
    candidates = set(np.argsort(-uncertainty, kind="stable")[:75].tolist())
    assert set(first) <= candidates
    with pytest.raises(ValueError, match="budget"):
        select(points, uncertainty, len(points) + 1)


def test_uncertainty_follows_its_definitions() -> None:
    boxes = [[0.5], [0.99], [0.9, 0.1], []]
    for method in ("least_confidence", "margin", "entropy"):
        scores = image_uncertainty(boxes, method)  # type: ignore[arg-type]
        assert scores[3] == 0.0 and scores[0] > scores[1]
    assert image_uncertainty([[0.5]], "entropy")[0] == pytest.approx(1.0)
    assert image_uncertainty([[0.8]], "least_confidence")[0] == pytest.approx(0.2)
    assert image_uncertainty([[0.8]], "margin")[0] == pytest.approx(0.4)


def test_ten_thousand_images_of_256_d_with_a_budget_of_1000_within_10_s() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(10_000, 256)).astype(np.float32)
    uncertainty = rng.random(10_000)
    started = time.perf_counter()
    picked = select(points, uncertainty, 1000, prefilter=0)
    seconds = time.perf_counter() - started
    print(f"\n10,000 x 256-d, budget 1,000, k-center over the whole pool: {seconds:.2f} s")
    assert len(set(picked)) == 1000 and seconds <= 10
