"""The encoder queue's ordering, with an encode function that blocks until the test lets it finish."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.base import ImageEmbedding
from server.encode_scheduler import EncodeScheduler, Priority


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
        return ImageEmbedding(torch.zeros(1, 1, 1, 1), (1, 1), (1, 1))


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
