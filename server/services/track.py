"""Tracking sessions: trackers by name, and their per-object states kept server-side under short ids.

CVAT signs every tracker state and sends it through the browser on every frame, so states must be small: the
client only ever holds an id. Entries expire after a TTL and the store is capped in bytes (oldest use goes
first); an unknown or expired id is a clear 404 telling the client to start tracking again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.base import ImageEmbedding
from models.registry import ModelRegistry
from models.shapes import Shape
from models.tracker import Frame, Tracker, TrackerInputError
from server.errors import ApiError
from server.inputs.images import decode_image, image_id
from server.services.sam import SamService
from server.settings import Settings

PROPAGATE_SUFFIX = "-propagate"
CVAT_TYPES = {"box": "rectangle", "polygon": "polygon", "mask": "mask"}  # what each object was started as


@dataclass
class TrackEntry:
    tracker: str
    state: Any
    size: tuple[int, int]  # (height, width) of the video
    scope: str  # who may step it (a CVAT function id, or "api")
    shape_type: str  # the CVAT type the object was started as, and is answered in
    expires: float = 0.0
    nbytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class TrackStateStore:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self._entries: OrderedDict[str, TrackEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.expired = 0
        self.evicted = 0

    def add(self, entry: TrackEntry) -> str:
        state_id = secrets.token_urlsafe(12)
        with self._lock:
            self._drop_expired()
            entry.expires = self._clock() + self.ttl_s
            self._entries[state_id] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.evicted += 1
        return state_id

    def get(self, state_id: str, scope: str) -> TrackEntry:
        with self._lock:
            self._drop_expired()
            entry = self._entries.get(state_id)
            if entry is None or entry.scope != scope:
                raise ApiError(
                    404,
                    "unknown_track_state",
                    f"No tracking state {state_id[:32]!r} here: it expired (after {self.ttl_s:.0f} s "
                    "unused), was evicted, belongs to another tracker, or the server restarted. Start "
                    "tracking the object again from the current frame.",
                )
            self._entries.move_to_end(state_id)
            entry.expires = self._clock() + self.ttl_s
            return entry

    def resize(self, entry: TrackEntry, nbytes: int) -> None:
        with self._lock:
            self._bytes += nbytes - entry.nbytes
            entry.nbytes = nbytes

    def remove(self, state_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(state_id, None)
            if entry is not None:
                self._bytes -= entry.nbytes
            return entry is not None

    def remove_where(self, doomed: Callable[[TrackEntry], bool]) -> int:
        with self._lock:
            ids = [state_id for state_id, entry in self._entries.items() if doomed(entry)]
            for state_id in ids:
                self._bytes -= self._entries.pop(state_id).nbytes
            return len(ids)

    def _drop_expired(self) -> None:
        now = self._clock()
        for state_id in [k for k, e in self._entries.items() if e.expires <= now]:
            self._bytes -= self._entries.pop(state_id).nbytes
            self.expired += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"states": len(self._entries), "bytes": self._bytes, "expired": self.expired,
                    "evicted": self.evicted}  # fmt: skip


class TrackService:
    def __init__(self, registry: ModelRegistry, sam: SamService, settings: Settings) -> None:
        self.registry = registry
        self.sam = sam
        self.settings = settings
        self.store = TrackStateStore(settings.track_state_bytes, settings.track_state_ttl_s)
        self._weight_free: dict[str, Tracker] = registry.weight_free_trackers()
        self._sam: dict[str, Tracker] = {}
        self._shared: dict[str, tuple[Tracker, Tracker]] = {}  # (the registry's tracker, it on the cache)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Weight-free trackers, SAM propagation per loaded SAM model, and loaded tracker models (SAM 2, whose
        own tracker replaces propagation)."""
        loaded = [r for r in self.registry.describe() if r["state"] == "loaded"]
        models = [r["name"] for r in loaded if "tracker" in r["kinds"]]
        segmenters = [r["name"] + PROPAGATE_SUFFIX for r in loaded if r["kinds"] == ["segmenter"]]
        return [*self._weight_free, *segmenters, *models]

    def tracker(self, name: str) -> Tracker:
        if name in self._weight_free:
            return self._weight_free[name]
        if name.endswith(PROPAGATE_SUFFIX):
            model = name.removesuffix(PROPAGATE_SUFFIX)
            with self._lock:
                if name not in self._sam:

                    def embed(frame: Frame, model: str = model) -> Any:
                        return self.sam.embed_decoded(model, frame.content_id, frame.image)

                    # An unknown or unavailable segmenter: the registry's own 4xx/503.
                    self._sam[name] = self.registry.propagation_tracker(model, embed)
                return self._sam[name]
        if name in self.registry.enabled or self._is_known_tracker_model(name):
            tracker = self.registry.tracker(name)  # loading or unavailable: the registry's own 503
            if "segmenter" in self.registry.record(name).kinds:
                return self._on_embeddings(name, tracker)
            return tracker
        raise ApiError(
            404, "unknown_tracker", f"No tracker {name!r}; GET /v1/trackers lists the available ones."
        )

    def _on_embeddings(self, name: str, tracker: Tracker) -> Tracker:
        """A model's tracker reading frames' features from its clicks' cache (L1, L2, prefetch), when it can
        (SAM 2): a frame clicked on, prefetched, or seen by several objects is encoded once."""
        with self._lock:
            shared = self._shared.get(name)
            if shared is None or shared[0] is not tracker:  # first use, or the model was reloaded

                def embed(frame: Frame, model: str = name) -> ImageEmbedding:
                    return self.sam.embed_decoded(model, frame.content_id, frame.image)

                shared = self._shared[name] = (tracker, tracker.on_embeddings(embed) or tracker)
            return shared[1]

    def forget_model(self, model: str) -> int:
        """After `model` was unloaded: its propagation tracker and every object state built on it go (a
        later step of one is a 404 telling the client to start again). Returns the states dropped."""
        names = {model, model + PROPAGATE_SUFFIX}
        with self._lock:
            self._sam.pop(model + PROPAGATE_SUFFIX, None)
            self._shared.pop(model, None)
        return self.store.remove_where(lambda entry: entry.tracker in names)

    def _is_known_tracker_model(self, name: str) -> bool:
        return any(r["name"] == name and "tracker" in r["kinds"] for r in self.registry.describe())

    def frame(self, data: bytes) -> Frame:
        return Frame(decode_image(data, self.settings.max_image_pixels), image_id(data))

    def init(
        self, name: str, frame: Frame, shapes: list[Shape], scope: str, answer_as: list[str] | None = None
    ) -> list[str]:
        """One state per shape; nothing is stored when any shape is refused. `answer_as`: the CVAT type each
        object is answered in on later frames (default: the type it was given as)."""
        if not shapes:
            raise ApiError(422, "no_shapes", "Give at least one shape to track.")
        if len(shapes) > self.settings.track_max_objects:
            raise ApiError(
                422,
                "too_many_shapes",
                f"{len(shapes)} shapes in one call; at most {self.settings.track_max_objects} "
                "(LABELSERVE_TRACK_MAX_OBJECTS).",
            )
        tracker = self.tracker(name)
        states = []
        for index, shape in enumerate(shapes):
            if shape.kind not in tracker.accepts:
                raise ApiError(
                    422,
                    "unsupported_shape",
                    f"shape {index}: tracker {name!r} follows {', '.join(tracker.accepts)} shapes, "
                    f"not {shape.kind}.",
                )
            try:
                states.append(tracker.init(frame, shape))
            except TrackerInputError as exc:
                raise ApiError(422, "bad_track_shape", f"shape {index}: {exc}.") from None
        answer_as = answer_as or [CVAT_TYPES[shape.kind] for shape in shapes]
        return [
            self.store.add(
                TrackEntry(name, state, frame.size, scope, as_type, nbytes=tracker.state_bytes(state))
            )
            for state, as_type in zip(states, answer_as, strict=True)
        ]

    def step(self, frame: Frame, state_ids: list[str], scope: str) -> list[tuple[Shape | None, str]]:
        """Each object on `frame` (None when lost) and the CVAT type it was started as. All ids are checked
        before any state moves."""
        entries = [self.store.get(state_id, scope) for state_id in state_ids]
        for state_id, entry in zip(state_ids, entries, strict=True):
            if entry.size != frame.size:
                raise ApiError(
                    422,
                    "frame_size_changed",
                    f"state {state_id[:32]!r} tracks a {entry.size[1]}x{entry.size[0]} video but this "
                    f"frame is {frame.size[1]}x{frame.size[0]}; start tracking again for another video.",
                )
        out: list[tuple[Shape | None, str]] = []
        for entry in entries:
            tracker = self.tracker(entry.tracker)
            with entry.lock:  # one object's frames go in order, even from concurrent requests
                try:
                    out.append((tracker.step(entry.state, frame), entry.shape_type))
                except TrackerInputError as exc:
                    raise ApiError(422, "bad_track_frame", f"{exc}.") from None
                self.store.resize(entry, tracker.state_bytes(entry.state))
        return out

    def forget(self, state_id: str, scope: str) -> bool:
        try:
            self.store.get(state_id, scope)
        except ApiError:
            return False
        return self.store.remove(state_id)

    def stats(self) -> dict[str, int]:
        return self.store.snapshot()
