"""Which models exist, which are loaded, and why the others are not; and the one place every model and
tracker is built: BACKENDS, one row per backend, and the trackers built on other things (SAM propagation on
a segmenter, a video job's multi-object tracker).

To add a backend: write its builder (name, architecture, checkpoint or what to build randomly, config,
device) -> model, and add a row; a manifest entry (weights/manifest.json) it `serves` then becomes a model.
A backend may serve several kinds from one set of weights (SAM 2: clicks and video tracking): its builder
returns one object per kind, and the model is listed once, under its first kind, with all of them in `kinds`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from models.base import (
    UNLOADED,
    ImageEncoder,
    ModelLoading,
    ModelUnavailable,
    Segmenter,
    UnknownModel,
    load_command,
)
from models.concept import ConceptModel
from models.config import HasModelsConfig, ModelsConfig
from models.detector import Detector, DetectorInfo
from models.multi_tracker import MultiTracker, TrackerParams
from models.sam import SAM_ARCHITECTURES, SamSegmenter, build_sam, encoder_autocast
from models.sam2 import SAM2_CONFIGS
from models.sam3 import SAM3_ARCHITECTURES
from models.sam_tracker import Embed, SamPropagationTracker
from models.tracker import Tracker
from weights import store

log = logging.getLogger("labelserve.models")

State = Literal["loaded", "loading", "unavailable", "failed", "disabled"]
Kind = Literal["segmenter", "detector", "tracker", "concept"]
EncoderKind = Literal["segmenter", "concept"]  # the kinds whose image features are cached
Model = Segmenter | Detector | Tracker | ConceptModel
# What each kind is called where a request asks a model for a kind it does not serve.
HEADS = {
    "segmenter": "click head (POST /v1/sam/{model}/segment)",
    "concept": "concept head (POST /v1/concepts/{model})",
    "detector": "detector",
    "tracker": "tracker",
}
# (model name, architecture, its checkpoint or None for seeded random weights, config, device) -> the model,
# or for a backend of several kinds one object per kind (sharing weights)
Build = Callable[[str, str, Path | None, ModelsConfig, torch.device], Model | dict[Kind, Model]]


@dataclass(frozen=True)
class Backend:
    kind: Kind
    build: Build
    # The manifest entries (weights/manifest.json) it builds; None: a weight-free tracker, always served.
    serves: Callable[[store.WeightEntry], bool] | None = None
    also: tuple[Kind, ...] = ()  # further kinds the same built model serves

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return (self.kind, *self.also)


def _encoder_options(config: ModelsConfig) -> dict:
    """What every image encoder (SAM, SAM 2, SAM 3) takes from the configuration: its cache's dtype and
    device, and its encoder's autocast on CUDA."""
    return {
        "cache_dtype": getattr(torch, config.cache_dtype),
        "cache_on_model_device": config.cache_device == "model",
        "encoder_autocast": encoder_autocast(config.encoder_dtype),
    }


def _build_sam(name: str, architecture: str, checkpoint: Path | None, config: ModelsConfig,
               device: torch.device) -> Segmenter:  # fmt: skip
    segmenter = SamSegmenter(
        name,
        architecture,
        build_sam(architecture, checkpoint),
        device,
        **_encoder_options(config),
    )
    if device.type == "cuda":  # part of loading: /readyz waits for it, clicks do not
        segmenter.warm_up(config.warm_up_batch)
    return segmenter


def _build_ultralytics(name: str, architecture: str, checkpoint: Path | None, config: ModelsConfig,
                       device: torch.device) -> Detector:  # fmt: skip
    """Every ultralytics model (detect, segment, pose, obb, classify) is built here, offline."""
    from models.yolo import UltralyticsDetector, configure_offline, load_yolo

    configure_offline(config.data_dir / "ultralytics")
    model = load_yolo(checkpoint or f"{architecture}.yaml")
    where = "cpu" if device.type == "cpu" else "0"
    return UltralyticsDetector(name, model, where, lambda: apply_thread_count(config))


def _build_sam2(name: str, architecture: str, checkpoint: Path | None, config: ModelsConfig,
                device: torch.device) -> dict[Kind, Model]:  # fmt: skip
    """One SAM 2 model, two faces: clicks (Sam2Segmenter) and video tracking (Sam2Tracker) share its weights,
    and the tracker can read the clicks' cached embeddings (TrackService)."""
    from models.sam2 import Sam2Segmenter
    from models.sam2_tracker import Sam2Tracker, build_sam2

    model = build_sam2(architecture, checkpoint, device)
    segmenter = Sam2Segmenter(
        name,
        architecture,
        model,
        **_encoder_options(config),
    )
    if device.type == "cuda":
        segmenter.warm_up(config.warm_up_batch)
    return {"segmenter": segmenter, "tracker": Sam2Tracker(name, model, config.sam2_memory_frames)}


def _build_sam3(name: str, architecture: str, checkpoint: Path | None, config: ModelsConfig,
                device: torch.device) -> dict[Kind, Model]:  # fmt: skip
    """SAM 3 concepts from a local snapshot directory; random weights for the architecture of the snapshot's
    config.json when only that is there (tests: a small SAM 3), else for the full-size SAM 3. The same model
    is a detector of the configured vocabulary's labels (models/concept_detector.py), and its tracker (same
    snapshot, same backbone) the click head (models/sam3_clicks.py)."""
    from models.concept_detector import ConceptDetector
    from models.sam3 import Sam3Concepts, load_sam3, random_sam3, snapshot_config
    from models.sam3_clicks import Sam3Clicks, load_tracker, random_tracker

    if checkpoint is not None:
        model, processor = load_sam3(checkpoint)
        tracker = load_tracker(checkpoint, model)
    else:
        model, processor = random_sam3(snapshot_config(config.weights_dir / store.get_entry(name).filename))
        tracker = random_tracker(model, config.random_seed)
    concepts = Sam3Concepts(
        name,
        architecture,
        model,
        processor,
        device,
        **_encoder_options(config),
        text_cache_bytes=config.concept_text_cache_bytes,
    )
    # The click head reads the same backbone (one module) through its own neck; its encode runs the backbone
    # under the concept model's lock, and a concept encode fills its cache entry too (shared_pass).
    clicks = Sam3Clicks(
        name,
        architecture,
        tracker,
        concepts.prepare,
        concepts.backbone,
        concepts.encoder_lock,
        device,
        **_encoder_options(config),
    )
    concepts.clicks = clicks
    if device.type == "cuda":
        concepts.warm_up(config.warm_up_batch)
    output = "box" if config.concept_output == "box" else "mask"
    detector = ConceptDetector(name, concepts, config.concept_vocabulary, output)
    return {"concept": concepts, "segmenter": clicks, "detector": detector}


def _build_medianflow(name: str, architecture: str, checkpoint: Path | None, config: ModelsConfig,
                      device: torch.device) -> Tracker:  # fmt: skip
    from models.box_tracker import MedianFlowTracker

    return MedianFlowTracker()


# Every backend, by name. A manifest entry is served by the first row whose `serves` takes it.
BACKENDS: dict[str, Backend] = {
    "sam": Backend("segmenter", _build_sam, serves=lambda entry: entry.architecture in SAM_ARCHITECTURES),
    "ultralytics": Backend("detector", _build_ultralytics, serves=lambda entry: entry.kind == "detector"),
    "sam2": Backend(
        "segmenter", _build_sam2, serves=lambda e: e.architecture in SAM2_CONFIGS, also=("tracker",)
    ),
    "sam3": Backend(
        "concept",
        _build_sam3,
        serves=lambda e: e.architecture in SAM3_ARCHITECTURES,
        also=("segmenter", "detector"),
    ),
    "medianflow": Backend("tracker", _build_medianflow),
}
LOCAL_CHECKPOINTS = "ultralytics"  # the backend of LABELSERVE_DETECTOR_PATHS' checkpoints


def backend_of(entry: store.WeightEntry) -> str | None:
    """The backend that builds a manifest entry; None for an entry no backend serves."""
    return next((name for name, b in BACKENDS.items() if b.serves is not None and b.serves(entry)), None)


def multi_tracker(params: TrackerParams, info: DetectorInfo, state: bytes | None = None) -> MultiTracker:
    """A video job's multi-object tracker (ultralytics' ByteTrack or BoT-SORT, `params.type`) over the
    detections of a detector described by `info`; `state` restores a checkpoint (MultiTracker.snapshot)."""
    return MultiTracker(params, info, state)


@dataclass
class ModelRecord:
    name: str
    kind: str  # its first kind; `kinds` lists every kind it serves
    architecture: str
    state: State = "disabled"
    weights: Literal["checkpoint", "random-init"] | None = None
    message: str = ""
    fix: str | None = None
    load_seconds: float | None = None
    path: Path | None = None  # a local checkpoint the operator configured (not in the manifest)
    backend: str = LOCAL_CHECKPOINTS  # its row in BACKENDS
    kinds: tuple[str, ...] = ()
    parts: dict[str, Model] = field(default_factory=dict, repr=False)  # the loaded model, by kind

    def __post_init__(self) -> None:
        self.kinds = self.kinds or (self.kind,)

    @property
    def model(self) -> Model | None:
        """The loaded model (of its first kind), or None."""
        return self.parts.get(self.kind)

    def describe(self) -> dict:
        detector = self.parts.get("detector")
        return {
            "name": self.name,
            "kind": self.kind,
            "kinds": list(self.kinds),
            "architecture": self.architecture,
            "state": self.state,
            "available": self.state == "loaded",
            "weights": self.weights,
            "message": self.message,
            "fix": self.fix,
            "load_seconds": self.load_seconds,
            **(
                {
                    "task": detector.info.task,
                    "classes": detector.info.class_names,
                    "keypoints": list(detector.info.keypoint_names),
                }
                if isinstance(detector, Detector)
                else {}
            ),
        }


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def apply_thread_count(config: ModelsConfig) -> None:
    # ultralytics lowers torch's thread count process-wide; call this again after it sets up a predictor.
    torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)


class ModelRegistry:
    def __init__(self, config: ModelsConfig | HasModelsConfig) -> None:
        """`config`: a ModelsConfig, or what makes one (the server's Settings)."""
        self.config = config if isinstance(config, ModelsConfig) else config.models_config()
        self.device = pick_device(self.config.device)
        self._lock = threading.Lock()  # state changes through the API (load, unload)
        self._records: dict[str, ModelRecord] = {}
        for entry in store.load_manifest().values():
            backend = backend_of(entry)
            if backend is not None:
                kinds = BACKENDS[backend].kinds
                self._records[entry.name] = ModelRecord(
                    entry.name, kinds[0], entry.architecture, backend=backend, kinds=kinds
                )
        for name, path in self.config.detector_paths.items():
            kind = BACKENDS[LOCAL_CHECKPOINTS].kind
            self._records[name] = ModelRecord(name, kind, LOCAL_CHECKPOINTS, path=Path(path))
        unknown = [name for name in self.config.models if name not in self._records]
        if unknown:
            raise ValueError(
                f"LABELSERVE_MODELS names unknown models {unknown}; known: {sorted(self._records)}"
            )
        for record in self._records.values():
            if record.name in self.enabled:
                record.state, record.message = "loading", "queued for loading"
            else:
                record.message = (
                    "not enabled; add it to LABELSERVE_MODELS to load it at start "
                    f"(now {self.config.models}), or {load_command(record.name)} to load it now"
                )
                record.fix = f"LABELSERVE_MODELS={','.join([*self.config.models, record.name])}"

    @property
    def enabled(self) -> list[str]:
        return [
            *self.config.models,
            *(n for n in self.config.detector_paths if n not in self.config.models),
        ]

    def names_of(self, kind: str) -> list[str]:
        """The enabled models of a kind ("segmenter", "detector", "tracker"), loaded or not."""
        return [name for name in self.enabled if kind in self._records[name].kinds]

    # ---- loading ------------------------------------------------------------------------------------------
    def load_enabled(self) -> None:
        apply_thread_count(self.config)
        for name in self.enabled:
            self._load(self._records[name])

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load_enabled, name="model-loader", daemon=True)
        thread.start()
        return thread

    def request_load(self, name: str) -> ModelRecord:
        """Starts loading `name` in the background, unless it is loaded or loading already (the record's
        state says which). A model not in LABELSERVE_MODELS can be loaded this way too."""
        record = self.record(name)
        with self._lock:
            if record.state in ("loaded", "loading"):
                return record
            record.state, record.message, record.fix = "loading", "loading (requested through the API)", None
            record.weights = record.load_seconds = None
        threading.Thread(target=self._load, args=(record,), name=f"load-{name}", daemon=True).start()
        return record

    def unload(self, name: str) -> tuple[State, Model | None]:
        """Forgets a loaded model; new work for it gets a 503 naming the load endpoint. Returns the state it
        had and the model object, whose memory is freed once the services drop their references to it
        (Services.forget_model) and work already running with it ends. Only a loaded model is unloaded."""
        record = self.record(name)
        with self._lock:
            before, model = record.state, record.model
            if before == "loaded":
                record.parts = {}
                record.state, record.weights, record.load_seconds = "disabled", None, None
                record.message, record.fix = UNLOADED, load_command(name)
        return before, model

    def _load(self, record: ModelRecord) -> None:
        started = time.perf_counter()
        source = self._weights_source(record)
        if source is None:
            return
        try:
            if record.weights == "random-init":
                torch.manual_seed(self.config.random_seed)
            record.parts = self._build(record, source)
        except Exception as exc:  # a corrupt checkpoint must not take the server down
            record.state, record.message = "failed", f"loading failed: {exc}"
            record.fix = f"labelserve weights verify {record.name} --dir {self.config.weights_dir}"
            log.exception("model %s failed to load", record.name)
            return
        record.load_seconds = round(time.perf_counter() - started, 2)
        record.state, record.fix = "loaded", None
        record.message = (
            "RANDOM-INIT WEIGHTS: real compute cost, meaningless output (tests and benchmarks only)"
            if record.weights == "random-init"
            else f"loaded from {source}"
        )
        log.info(
            "model %s loaded on %s in %.1fs (%s)",
            record.name,
            self.device,
            record.load_seconds,
            record.weights,
        )

    def _weights_source(self, record: ModelRecord) -> Path | str | None:
        """The checkpoint to load, the architecture to build randomly, or None (record says why not)."""
        if record.path is not None and record.path.suffix in (".yaml", ".yml"):
            # A model definition, no weights: only for explicit random-init runs (tests, benchmarks).
            if not self.config.random_init:
                record.state = "unavailable"
                record.message = f"{record.path} is an architecture with no weights"
                record.fix = "give a .pt checkpoint, or set LABELSERVE_RANDOM_INIT=true (tests, benchmarks)"
                return None
            record.weights = "random-init"
            return record.path.stem
        if record.path is not None:
            if not record.path.is_file():
                record.state = "unavailable"
                record.message = f"checkpoint {record.path} (LABELSERVE_DETECTOR_PATHS) does not exist"
                record.fix = f"put the checkpoint at {record.path} or fix LABELSERVE_DETECTOR_PATHS"
                return None
            record.weights = "checkpoint"
            return record.path
        try:
            path = store.resolve(record.name, self.config.weights_dir)
            record.weights = "checkpoint"
            return path
        except store.MissingWeights as missing:
            if not self.config.random_init:
                record.state, record.message, record.fix = "unavailable", str(missing), missing.fix_command
                log.warning("model %s unavailable: %s", record.name, missing)
                return None
            record.weights = "random-init"
            return record.architecture  # built from its definition with seeded random weights
        except store.WeightsError as bad:
            record.state, record.message = "unavailable", str(bad)
            record.fix = f"labelserve weights fetch {record.name} --dir {self.config.weights_dir}"
            log.error("model %s refused: %s", record.name, bad)
            return None

    def _build(self, record: ModelRecord, source: Path | str) -> dict[str, Model]:
        """The built model by kind; `source`: the checkpoint, or (seeded random weights) the architecture."""
        checkpoint = source if isinstance(source, Path) else None
        architecture = source if isinstance(source, str) else record.architecture
        built = BACKENDS[record.backend].build(
            record.name, architecture, checkpoint, self.config, self.device
        )
        return dict(built) if isinstance(built, dict) else {record.kind: built}

    # ---- trackers built on other things -------------------------------------------------------------------
    def weight_free_trackers(self) -> dict[str, Tracker]:
        """A new instance of every tracker that needs no weights, by name (always served)."""
        found = {}
        for name, backend in BACKENDS.items():
            if backend.serves is None:
                model = backend.build(name, name, None, self.config, self.device)
                assert isinstance(model, Tracker)
                found[name] = model
        return found

    def propagation_tracker(self, model: str, embed: Embed) -> Tracker:
        """SAM mask propagation ("<model>-propagate") on the loaded segmenter `model`; `embed` gives a frame's
        embedding through the server's cache."""
        return SamPropagationTracker(self.segmenter(model), embed)

    # ---- lookup -------------------------------------------------------------------------------------------
    def record(self, name: str) -> ModelRecord:
        record = self._records.get(name)
        if record is None:
            raise UnknownModel(f"unknown model {name!r}; GET /v1/models lists them: {sorted(self._records)}")
        return record

    def segmenter(self, name: str) -> Segmenter:
        model = self._loaded(name, "segmenter")
        assert isinstance(model, Segmenter)
        return model

    def detector(self, name: str) -> Detector:
        model = self._loaded(name, "detector")
        assert isinstance(model, Detector)
        return model

    def tracker(self, name: str) -> Tracker:
        model = self._loaded(name, "tracker")
        assert isinstance(model, Tracker)
        return model

    def concept(self, name: str) -> ConceptModel:
        model = self._loaded(name, "concept")
        assert isinstance(model, ConceptModel)
        return model

    def encoder(self, name: str, kind: EncoderKind | None = None) -> ImageEncoder:
        """The image encoder whose features the embedding cache holds: that of `kind` ("segmenter": clicks,
        "concept"), or with no kind the model's widest one, the concept model's where it has both (SAM 3:
        its encode fills the clicks' cache entry too; prefetch uses it)."""
        record = self.record(name)
        if kind is None:
            kind = next((k for k in ("concept", "segmenter") if k in record.kinds), None)
            if kind is None:
                raise UnknownModel(
                    f"{name!r} is a {record.kind}: it has no image encoder whose features are cached; GET "
                    "/v1/models lists the segmenters and concept models"
                )
        model = self._loaded(name, kind)
        assert isinstance(model, ImageEncoder)
        return model

    def _loaded(self, name: str, kind: str) -> Model:
        record = self.record(name)
        if kind not in record.kinds:
            raise UnknownModel(
                f"{name!r} is a {record.kind}, not a {kind}: it has no {HEADS[kind]}; GET /v1/models lists "
                f"the {kind}s"
            )
        model = record.parts.get(kind)
        if record.state == "loaded" and model is not None:
            return model
        if record.state == "loading":
            raise ModelLoading(f"model {name!r} is still loading; retry in a few seconds")
        raise ModelUnavailable(f"model {name!r} is {record.state}: {record.message}", record.fix)

    def describe(self) -> list[dict]:
        return [record.describe() for record in self._records.values()]

    @property
    def ready(self) -> bool:
        return all(self._records[name].state != "loading" for name in self.enabled)
