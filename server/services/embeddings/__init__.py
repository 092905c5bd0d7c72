"""Where an image embedding comes from: L1 (in process) → L2 (Redis or disk, optional) → the encoder.

A miss in L1 is single-flight (l1.py): one request looks in L2 and, failing that, decodes and encodes,
while concurrent requests for the same image wait for it. An L2 hit fills L1; an encode fills both.
L2 never fails a request: when it is down or slow it answers "miss" (and is counted), and the image is
encoded.

Before encoding, the decoded pixels' id is looked up among the aliases: the same picture in other bytes (a
frame prefetched from its original JPEG, then sent as PNG by CVAT's AI agent) reuses the embedding already
cached. Every encode records its pixel id. The aliases live in this process, bounded by count.

An encode may also yield another head's features from the same backbone pass (ImageEncoder.shared_pass: SAM
3's concept encode gives its click head's): they are cached under that head's own key, in L1 and L2.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from models.base import ImageEmbedding, ImageEncoder, unloaded
from server.inputs.images import decode_image, pixel_id
from server.lru import ByteLRU
from server.ops.timing import Timings
from server.services.embeddings.l1 import EmbeddingCache
from server.services.embeddings.l2 import L2Tier
from server.services.embeddings.l2.blob import dtype_name
from server.services.embeddings.scheduler import EncodeScheduler, EncodeTicket, Priority
from server.settings import Settings

Tier = Literal["l1", "l2", "encode"]
ALIASES_KEPT = 50_000  # pixel id → image id entries (about 250 bytes each)


@dataclass(frozen=True)
class Found:
    embedding: ImageEmbedding
    tier: Tier  # "l1" also when the request waited for a concurrent request's lookup or encode


class TieredEmbeddings:
    def __init__(self, settings: Settings, l2: L2Tier | None) -> None:
        self.l1: EmbeddingCache[ImageEmbedding] = EmbeddingCache(settings.cache_bytes, lambda e: e.nbytes)
        self.l2 = l2
        self.max_image_pixels = settings.max_image_pixels
        self.settings = settings
        self.encode_max_wait_ms = settings.encode_max_wait_ms
        self._schedulers: dict[str, EncodeScheduler] = {}
        self._lock = threading.Lock()
        # Encoders (segmenters, concept models) unloaded by forget(): a request that looked one up just before
        # must not start a new encoder around it (which would keep the model alive).
        self._forgotten: weakref.WeakSet[ImageEncoder] = weakref.WeakSet()
        # Background encodes queued or running, and the images interactive requests wait for: a click that
        # joins a background encode of its image (single-flight) promotes that encode (_encode, _awaiting).
        self._background: dict[Hashable, tuple[EncodeScheduler, EncodeTicket]] = {}
        self._awaited: Counter[Hashable] = Counter()
        self.aliases: ByteLRU[str] = ByteLRU(ALIASES_KEPT, lambda _: 1)  # pixel id → image id
        self._draining: Callable[[], Exception] | None = None  # set by drain(): why no encode starts

    def scheduler(self, segmenter: ImageEncoder) -> EncodeScheduler:
        with self._lock:
            if self._draining is not None:
                raise self._draining()
            if segmenter in self._forgotten:
                raise unloaded(segmenter.name)
            scheduler = self._schedulers.get(segmenter.queue_name)
            if scheduler is None:
                device = getattr(segmenter, "device", None)
                batch = self.settings.encode_batch_limit(getattr(device, "type", "cpu") == "cuda")
                scheduler = self._schedulers[segmenter.queue_name] = EncodeScheduler(
                    lambda prepared: segmenter.encode_prepared([prepared])[0],
                    segmenter.queue_name,
                    encode_batch=segmenter.encode_prepared,
                    max_batch=batch,
                    max_wait_ms=self.encode_max_wait_ms,
                )
            return scheduler

    def get_or_encode(
        self,
        segmenter: ImageEncoder,
        content_id: str,
        data: bytes,
        timings: Timings,
        priority: Priority,
        decoded: np.ndarray | None = None,
    ) -> Found:
        """`decoded`: the image already decoded (video frames), instead of `data`."""
        tiers: list[Tier] = []
        by_products: list[tuple[ImageEncoder, ImageEmbedding]] = []
        key = _l1_key(segmenter, content_id)

        def compute() -> ImageEmbedding:
            stored = self._from_l2(segmenter, content_id, timings)
            if stored is not None:
                tiers.append("l2")
                return stored
            if decoded is not None:
                image = decoded
            else:
                with timings.stage("decode_image"):
                    image = decode_image(data, self.max_image_pixels)
            with timings.stage("pixel_id"):
                pixels = pixel_id(image)
            alias = self.aliases.get(pixels, count=False)
            if alias is not None and alias != content_id:
                found = self.find(segmenter, alias, timings, count=False)
                if found is not None:
                    tiers.append(found.tier)
                    return found.embedding
            with timings.stage("resize"):  # here, not on the model's one encoder thread
                prepared = segmenter.prepare(image)
            del image
            ticket = self._encode(segmenter, key, prepared, priority)
            timings.add("encode_queue", ticket.queued_ms)
            timings.add("encode", ticket.run_ms)
            tiers.append("encode")
            embedding, siblings = segmenter.shared_pass(ticket.result())
            for sibling, theirs in siblings:  # the same pass's features for another head of the model
                self.l1.put(_l1_key(sibling, content_id), theirs)
                by_products.append((sibling, theirs))
            self.aliases.put(pixels, content_id)
            return embedding

        with timings.stage("embedding"), self._awaiting(key, priority):
            # Only requests count as hits and misses: prefetch and job lookups miss by design.
            embedding, _ = self.l1.get_or_compute(key, compute, count=priority == Priority.INTERACTIVE)
        tier = tiers[0] if tiers else "l1"
        if tier == "encode" and self.l2 is not None:
            # After the L1 fill: requests waiting for this encode do not wait for the L2 write as well.
            with timings.stage("l2_put"):
                self.l2.put(_l2_key(segmenter, content_id), embedding, segmenter.architecture)
                for sibling, theirs in by_products:
                    self.l2.put(_l2_key(sibling, content_id), theirs, sibling.architecture)
        return Found(embedding, tier)

    def _encode(
        self, segmenter: ImageEncoder, key: Hashable, prepared: Any, priority: Priority
    ) -> EncodeTicket:
        scheduler = self.scheduler(segmenter)
        if priority == Priority.INTERACTIVE:
            return scheduler.encode(prepared, priority)
        ticket = scheduler.submit(prepared, priority)
        with self._lock:
            self._background[key] = (scheduler, ticket)
            if self._awaited[key]:  # a click came for this image between the L1 lookup and now
                scheduler.promote(ticket)
        try:
            ticket.result()
        finally:
            with self._lock:
                self._background.pop(key, None)
        return ticket

    @contextmanager
    def _awaiting(self, key: Hashable, priority: Priority) -> Iterator[None]:
        """Marks an interactive request's image as awaited while it is looked up or encoded, promoting a
        background encode of the same image. The lock orders this against _encode's registration."""
        if priority != Priority.INTERACTIVE:
            yield
            return
        with self._lock:
            self._awaited[key] += 1
            if key in self._background:
                scheduler, ticket = self._background[key]
                scheduler.promote(ticket)
        try:
            yield
        finally:
            with self._lock:
                self._awaited[key] -= 1
                if not self._awaited[key]:
                    del self._awaited[key]

    def find(
        self, segmenter: ImageEncoder, content_id: str, timings: Timings, count: bool = True
    ) -> Found | None:
        """A cached embedding (L1, else L2, which then fills L1) without the image bytes; None if neither.
        `count=False`: not a request's own lookup (an alias of one), left out of the hit and miss counts."""
        embedding = self.l1.get(_l1_key(segmenter, content_id), count=count)
        if embedding is not None:
            return Found(embedding, "l1")
        embedding = self._from_l2(segmenter, content_id, timings)
        if embedding is None:
            return None
        self.l1.put(_l1_key(segmenter, content_id), embedding)
        return Found(embedding, "l2")

    def _from_l2(self, segmenter: ImageEncoder, content_id: str, timings: Timings) -> ImageEmbedding | None:
        if self.l2 is None:
            return None
        with timings.stage("l2_get"):
            stored = self.l2.get(_l2_key(segmenter, content_id), segmenter.architecture)
        # To a GPU-resident L1 (cache_device=model); on the CPU it is the stored embedding itself.
        return None if stored is None else stored.to(segmenter.cache_device)

    def clear(self, l2_too: bool) -> dict:
        """L1 always; L2 (this namespace, shared with other replicas) only when asked. May raise
        TierUnavailable when L2 cannot be reached."""
        cleared: dict = {"embeddings": self.l1.clear(), "l2": None}
        if l2_too and self.l2 is not None:
            cleared["l2"] = self.l2.clear()
        return cleared

    def forget(self, segmenter: ImageEncoder) -> int:
        """After `segmenter` was unloaded: its encoder finishes what is queued and stops, and its L1 entries
        go (they may live in GPU memory). L2 keeps its entries: a reload of the same weights uses them.
        Returns the number of L1 entries dropped."""
        encoders = (segmenter, *segmenter.siblings())
        with self._lock:
            self._forgotten.update(encoders)
            schedulers = [self._schedulers.pop(e.queue_name, None) for e in encoders]
        for scheduler in schedulers:
            if scheduler is not None:
                scheduler.retire(unloaded(segmenter.name))
        return self.l1.discard_where(lambda key: key[0] == segmenter.name)

    def stats(self) -> dict:
        with self._lock:
            schedulers = dict(self._schedulers)
        return {
            "embeddings": {"tier": "l1", **self.l1.snapshot()},
            "l2": self.l2.stats() if self.l2 is not None else None,
            "encoders": {name: scheduler.snapshot() for name, scheduler in schedulers.items()},
        }

    def drain(self, reason: Callable[[], Exception]) -> int:
        """The server is stopping: no encode starts any more (queued ones fail with `reason()`); embeddings
        already cached still serve clicks. Returns how many queued encodes failed."""
        with self._lock:
            self._draining = reason
            schedulers = list(self._schedulers.values())
        return sum(scheduler.drain(reason) for scheduler in schedulers)

    def close(self) -> None:
        with self._lock:
            schedulers = list(self._schedulers.values())
        for scheduler in schedulers:
            scheduler.close()
        if self.l2 is not None:
            self.l2.close()


def _l1_key(segmenter: ImageEncoder, content_id: str) -> tuple[str, str, str]:
    return (segmenter.name, content_id, segmenter.preprocessing_version)


def _l2_key(segmenter: ImageEncoder, content_id: str) -> str:
    # The dtype is part of the key: replicas configured for fp32 must not pick up fp16 entries.
    dtype = dtype_name(segmenter.cache_dtype)
    return f"{segmenter.name}:{segmenter.preprocessing_version}:{dtype}:{content_id}"
