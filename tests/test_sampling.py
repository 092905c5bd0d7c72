"""Choosing what to annotate next (issue #16, part 2), by construction: on a pool of k equal clusters with a
budget of k, k-center greedy covers the clusters and random picks do not; the sampler is deterministic for a
seed; uncertainty ranks as its definitions say; and 10,000 × 256-d with a budget of 1,000 takes ≤ 10 s."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


# -- sample jobs -----------------------------------------------------------------------------------------


def colour_embedding(model: str, data: bytes, image: np.ndarray) -> np.ndarray:
    """The engine's `embed` for these tests: an 8-bin histogram per channel (what a pooled SAM embedding is
    to real photos: a vector where look-alike images lie close)."""
    assert model == "sam_x" and data
    return np.concatenate([np.histogram(image[..., c], bins=8, range=(0, 256))[0] for c in range(3)]).astype(
        np.float32
    ) / (image.shape[0] * image.shape[1])


def test_a_sample_job_picks_one_image_per_look(tmp_path: Path) -> None:
    """12 looks (background colours) × 6 images; a budget of 12 with diversity only covers every look."""
    from server.errors import ApiError
    from server.jobs.engine import LocalEngine
    from server.jobs.spec import JobSpec
    from tests.jobs_helpers import RectDetector, encode_png, wait_for

    rng = np.random.default_rng(0)
    looks = rng.integers(0, 256, (12, 3))
    pool = tmp_path / "pool"
    pool.mkdir()
    look_of = {}
    for i in range(72):
        image = np.clip(looks[i % 12] + rng.normal(0, 6, (40, 50, 3)), 0, 255).astype(np.uint8)
        (pool / f"p_{i:03d}.png").write_bytes(encode_png(image))
        look_of[f"p_{i:03d}.png"] = i % 12

    def spec(budget: int, out: str, **sample: object) -> JobSpec:
        return JobSpec.model_validate(
            {"source": {"directory": str(pool)}, "detector": "rects",
             "sample": {"budget": budget, "embeddings": "sam_x", "prefilter": 0} | sample,
             "output": {"format": "ranking", "directory": str(tmp_path / out)}}
        )  # fmt: skip

    detector = RectDetector("detect")
    engine = LocalEngine(
        lambda _: detector,
        embed=colour_embedding,
        check_refine=lambda n: {"sam_x": 1}[n],
        state_db=tmp_path / "db",
    )
    try:
        job = engine.submit(spec(12, "out"))
        status = wait_for(engine, job.id)
        assert status.state == "completed", status
        ranking = json.loads((tmp_path / "out" / "ranking.json").read_text())
        picked = [row["image"] for row in ranking["images"]]
        assert [row["rank"] for row in ranking["images"]] == list(range(1, 13))
        assert {look_of[name] for name in picked} == set(range(12))  # every look once
        lines = (tmp_path / "out" / "ranking.csv").read_text().splitlines()
        assert lines[0] == "rank,index,image,uncertainty" and len(lines) == 13
        again = engine.submit(spec(12, "again"))
        assert wait_for(engine, again.id).state == "completed"
        assert json.loads((tmp_path / "again" / "ranking.json").read_text())["images"] == ranking["images"]

        with pytest.raises(ApiError) as big:
            engine.submit(spec(73, "big"))
        assert (big.value.status, big.value.code) == (400, "budget_too_large")
        with pytest.raises(ApiError) as unknown:
            engine.submit(spec(5, "u", embeddings="nope"))
        assert unknown.value.status == 404
    finally:
        engine.close()
    with pytest.raises(ValueError, match="ranking format is for sample jobs"):
        JobSpec.model_validate(
            {"source": {"directory": str(pool)}, "detector": "rects",
             "output": {"format": "ranking", "directory": str(tmp_path / "x")}}
        )  # fmt: skip
    bare = LocalEngine(lambda _: detector, state_db=tmp_path / "db2")
    try:
        with pytest.raises(ApiError) as no_sam:
            bare.submit(spec(5, "n"))
        assert (no_sam.value.status, no_sam.value.code) == (422, "embed_unavailable")
    finally:
        bare.close()


def test_the_cli_ranks_a_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from server.cli import prelabel as cli
    from tests.jobs_helpers import RectDetector, encode_png

    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        colour = (i % 4) * 60
        (pool / f"p_{i:02d}.png").write_bytes(
            encode_png(
                np.full((30, 30, 3), colour, np.uint8) + rng.integers(0, 5, (30, 30, 3), dtype=np.uint8)
            )
        )
    detector = RectDetector("detect")

    def run(*argv: str, sample_runtime: object = None) -> int:
        parser = argparse.ArgumentParser()
        runtime = lambda model, sam: ((lambda _: detector), None)  # noqa: E731 -- pre-labeling's, unused
        cli.add_prelabel_command(parser.add_subparsers(dest="command"), runtime, sample_runtime)  # type: ignore[arg-type]
        args = parser.parse_args(["prelabel", *argv, "--no-progress"])
        return args.func(args)

    def sample_runtime(model: str, sam: str):
        assert (model, sam) == ("rects", "sam_x")
        return (lambda _: detector), colour_embedding

    out = tmp_path / "next"
    argv = (str(pool), "--model", "rects", "--out", str(out), "--sample", "4", "--sample-embeddings", "sam_x")
    assert run(*argv, "--prefilter", "0", sample_runtime=sample_runtime) == 0
    assert capsys.readouterr().out.split() == [str(out / "ranking.json"), str(out / "ranking.csv")]
    picked = [row["image"] for row in json.loads((out / "ranking.json").read_text())["images"]]
    assert sorted(int(name[2:4]) % 4 for name in picked) == [0, 1, 2, 3]  # one of each shade
    assert run(*argv[:-2], sample_runtime=sample_runtime) == 2
    assert "--sample needs --sample-embeddings" in capsys.readouterr().err
    assert run(*argv) == 2  # a command without sampling
