"""The encoder queue's ordering, with an encode function that blocks until the test lets it finish (the
ordering is the subject here, so a real model's seconds per encode would only slow the tests down)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from models.base import ImageEmbedding, Segmenter
from server.errors import ApiError
from server.ops.timing import Timings
from server.services.embeddings import TieredEmbeddings
from server.services.embeddings.scheduler import EncodeScheduler, Priority

from .conftest import encode_image, make_settings


class GatedEncoder:
    """Encodes instantly once released; records the order in which images were encoded."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def __call__(self, image: np.ndarray) -> ImageEmbedding:
        self.started.release()
        assert self.release.acquire(timeout=10)
        label = int(image[0, 0, 0])
        if label == 255:
            raise RuntimeError("encoder exploded")
        self.order.append(label)
        return ImageEmbedding({"image_embed": torch.zeros(1, 1, 1, 1)}, (1, 1), (1, 1))


def image(label: int) -> np.ndarray:
    return np.full((2, 2, 3), label, np.uint8)


def test_interactive_goes_before_queued_background_work() -> None:
    encoder = GatedEncoder()
    scheduler = EncodeScheduler(encoder, "test")
    running = scheduler.submit(image(1), Priority.BACKGROUND)
    assert encoder.started.acquire(timeout=10)  # background 1 is in the encoder
    queued = [scheduler.submit(image(label), Priority.BACKGROUND) for label in (2, 3)]
    clicks = [scheduler.submit(image(label), Priority.INTERACTIVE) for label in (10, 11)]
    assert scheduler.snapshot()["queued"] == {"interactive": 2, "background": 2}
    for _ in range(5):
        encoder.release.release()
    for ticket in [running, *queued, *clicks]:
        ticket.result()
    # The running encode finishes; then both clicks, oldest first; then the background work.
    assert encoder.order == [1, 10, 11, 2, 3]
    assert [click.finished_before_start for click in clicks] == [1, 2]
    stats = scheduler.snapshot()
    assert stats["done"] == {"interactive": 2, "background": 3}
    assert stats["interactive_waited_encodes_max"] == 2  # the second click waited for the first one too
    scheduler.close()


def test_cancelled_background_ticket_is_skipped() -> None:
    encoder = GatedEncoder()
    scheduler = EncodeScheduler(encoder, "test")
    first = scheduler.submit(image(1), Priority.BACKGROUND)
    assert encoder.started.acquire(timeout=10)
    dropped = scheduler.submit(image(2), Priority.BACKGROUND)
    assert dropped.future.cancel()
    last = scheduler.submit(image(3), Priority.BACKGROUND)
    encoder.release.release()
    encoder.release.release()
    first.result(), last.result()
    assert encoder.order == [1, 3]
    scheduler.close()


def test_encoder_error_reaches_the_caller_and_the_worker_goes_on() -> None:
    encoder = GatedEncoder()
    scheduler = EncodeScheduler(encoder, "test")
    encoder.release.release()
    with pytest.raises(RuntimeError, match="exploded"):
        scheduler.encode(image(255), Priority.INTERACTIVE)
    encoder.release.release()
    assert scheduler.encode(image(4), Priority.INTERACTIVE).result() is not None
    scheduler.close()


def test_close_fails_queued_work_instead_of_leaving_it_waiting() -> None:
    encoder = GatedEncoder()
    scheduler = EncodeScheduler(encoder, "test")
    running = scheduler.submit(image(1), Priority.BACKGROUND)
    assert encoder.started.acquire(timeout=10)
    waiting = scheduler.submit(image(2), Priority.BACKGROUND)
    scheduler.close()
    with pytest.raises(RuntimeError, match="shut down"):
        waiting.result()
    encoder.release.release()
    running.result()  # the encode that was running still completes
    with pytest.raises(RuntimeError, match="shut down"):
        scheduler.submit(image(3), Priority.INTERACTIVE)


def test_drain_answers_queued_work_at_once_and_refuses_new_work() -> None:
    """SIGTERM's drain: the running encode completes; queued clicks and prefetch fail with the given error
    (each its own instance), and so does anything submitted afterwards."""
    encoder = GatedEncoder()
    scheduler = EncodeScheduler(encoder, "test")
    running = scheduler.submit(image(1), Priority.INTERACTIVE)
    assert encoder.started.acquire(timeout=10)
    queued = [
        scheduler.submit(image(label), p)
        for label, p in ((2, Priority.INTERACTIVE), (3, Priority.BACKGROUND))
    ]
    assert scheduler.drain(lambda: ApiError(503, "shutting_down", "stopping")) == 2
    errors = []
    for ticket in queued:
        with pytest.raises(ApiError, match="stopping") as raised:
            ticket.result()
        errors.append(raised.value)
    assert errors[0] is not errors[1]
    with pytest.raises(ApiError, match="stopping"):
        scheduler.submit(image(4), Priority.INTERACTIVE)
    encoder.release.release()
    running.result()
    assert encoder.order == [1]


def test_promoted_background_ticket_runs_with_the_clicks_in_their_order() -> None:
    encoder = GatedEncoder()
    scheduler = EncodeScheduler(encoder, "test")
    running = scheduler.submit(image(1), Priority.BACKGROUND)
    assert encoder.started.acquire(timeout=10)
    wanted = scheduler.submit(image(2), Priority.BACKGROUND)
    other = scheduler.submit(image(3), Priority.BACKGROUND)
    click = scheduler.submit(image(10), Priority.INTERACTIVE)
    scheduler.promote(wanted)  # a click now waits for image 2
    later_click = scheduler.submit(image(11), Priority.INTERACTIVE)
    scheduler.promote(running)  # already running: nothing to do
    for _ in range(5):
        encoder.release.release()
    for ticket in (running, wanted, other, click, later_click):
        ticket.result()
    assert encoder.order == [1, 10, 2, 11, 3]
    assert scheduler.snapshot()["promoted"] == 1
    scheduler.close()


class GatedSegmenter(Segmenter):
    """A segmenter whose encoder is the gated function above; nothing else of it is used here."""

    name = "gated"
    preprocessing_version = "test"

    def __init__(self) -> None:
        self.encoder = GatedEncoder()

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encoder(image)

    def decode(self, embedding, prompt, multimask):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def upsample(self, embedding, low_res_logits):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def low_res_from_mask(self, embedding, mask):  # noqa: ANN001, ANN201
        raise NotImplementedError


def test_a_click_on_an_image_being_prefetched_is_not_left_behind_other_clicks(tmp_path) -> None:
    """The click joins the prefetch's queued encode of its image (single-flight), and that encode is
    promoted, so it runs before clicks that came after this one."""
    embeddings = TieredEmbeddings(make_settings(tmp_path), l2=None)
    segmenter = GatedSegmenter()
    started = segmenter.encoder.started
    files = {label: encode_image(image(label)) for label in (1, 2, 10, 11)}

    def embed(label: int, priority: Priority):  # noqa: ANN202
        return pool.submit(embeddings.get_or_encode, segmenter, str(label), files[label], Timings(), priority)

    with ThreadPoolExecutor(4) as pool:
        prefetching = embed(1, Priority.BACKGROUND)
        assert started.acquire(timeout=10)  # image 1 is in the encoder
        queued = embed(2, Priority.BACKGROUND)
        wait_until(lambda: embeddings.scheduler(segmenter).snapshot()["queued"]["background"] == 1)
        clicked = embed(2, Priority.INTERACTIVE)  # the annotator opens the image being prefetched
        wait_until(lambda: embeddings.scheduler(segmenter).snapshot()["promoted"] == 1)
        other_click = embed(11, Priority.INTERACTIVE)
        wait_until(lambda: embeddings.scheduler(segmenter).snapshot()["queued"]["interactive"] == 2)
        for _ in range(3):
            segmenter.encoder.release.release()
        results = [f.result(timeout=10) for f in (prefetching, queued, clicked, other_click)]
    assert segmenter.encoder.order == [1, 2, 11]
    assert [r.tier for r in results] == ["encode", "encode", "l1", "encode"]  # the click shared the encode
    embeddings.close()


def wait_until(condition, timeout: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
