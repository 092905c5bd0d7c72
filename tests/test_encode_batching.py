"""Encoder micro-batching in the encode scheduler: images queued together share one encoder pass, interactive
first, and each gets its own embedding."""

from __future__ import annotations

import torch

from models.sam import SamSegmenter, build_sam
from server.services.embeddings.scheduler import EncodeScheduler, Priority

from .conftest import synthetic_scene


def test_queued_encodes_share_a_pass_and_match_single_encodes() -> None:
    torch.manual_seed(0)
    segmenter = SamSegmenter("mobile_sam", "mobile_sam", build_sam("mobile_sam", None), torch.device("cpu"),
                             cache_dtype=torch.float32)  # fmt: skip
    scheduler = EncodeScheduler(
        segmenter.encode, "t", encode_batch=segmenter.encode_batch, max_batch=3, max_wait_ms=0
    )
    images = [synthetic_scene(320, 240, seed=i) for i in range(4)]
    with segmenter.encoder_lock:  # hold the encoder: the first ticket starts, the rest queue behind it
        first = scheduler.submit(images[0], Priority.INTERACTIVE)
        background = scheduler.submit(images[1], Priority.BACKGROUND)
        clicks = [scheduler.submit(image, Priority.INTERACTIVE) for image in images[2:]]
    tickets = [first, background, *clicks]
    results = [ticket.result() for ticket in tickets]
    # The first ran alone; the next pass took both interactive encodes before the background one (3 max).
    assert scheduler.snapshot()["batch_sizes"] == {3: 1}
    assert all(c.started <= background.started for c in clicks)  # type: ignore[operator]
    for image, embedding in zip(images[:1] + images[1:2] + images[2:], results, strict=True):
        single = segmenter.encode(image)["image_embed"]
        error = (embedding["image_embed"] - single).norm() / single.norm()
        assert float(error) < 1e-4
    scheduler.close()
