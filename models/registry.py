"""Which models exist, which are loaded, and why the others are not."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from models.base import ModelLoading, ModelUnavailable, Segmenter, UnknownModel
from models.sam import SAM_ARCHITECTURES, SamSegmenter, build_sam
from server.settings import Settings
from weights import store

log = logging.getLogger("labelserve.models")

State = Literal["loaded", "loading", "unavailable", "failed", "disabled"]


@dataclass
class ModelRecord:
    name: str
    kind: str
    architecture: str
    state: State = "disabled"
    weights: Literal["checkpoint", "random-init"] | None = None
    message: str = ""
    fix: str | None = None
    load_seconds: float | None = None
    model: Segmenter | None = field(default=None, repr=False)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "state": self.state,
            "available": self.state == "loaded",
            "weights": self.weights,
            "message": self.message,
            "fix": self.fix,
            "load_seconds": self.load_seconds,
        }


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def apply_thread_count(settings: Settings) -> None:
    # ultralytics lowers torch's thread count process-wide; call this again after it sets up a predictor.
    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self._records: dict[str, ModelRecord] = {}
        for entry in store.load_manifest().values():
            if entry.architecture in SAM_ARCHITECTURES:
                self._records[entry.name] = ModelRecord(entry.name, "segmenter", entry.architecture)
        unknown = [name for name in settings.models if name not in self._records]
        if unknown:
            raise ValueError(
                f"LABELSERVE_MODELS names unknown models {unknown}; known: {sorted(self._records)}"
            )
        for record in self._records.values():
            if record.name in settings.models:
                record.state, record.message = "loading", "queued for loading"
            else:
                record.message = (
                    f"not enabled; add it to LABELSERVE_MODELS to load it (now {settings.models})"
                )
                record.fix = f"LABELSERVE_MODELS={','.join([*settings.models, record.name])}"

    # ---- loading ------------------------------------------------------------------------------------------
    def load_enabled(self) -> None:
        apply_thread_count(self.settings)
        for name in self.settings.models:
            self._load(self._records[name])

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load_enabled, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load(self, record: ModelRecord) -> None:
        started = time.perf_counter()
        entry = store.load_manifest()[record.name]
        try:
            checkpoint = store.resolve(record.name, self.settings.weights_dir)
            record.weights = "checkpoint"
        except store.MissingWeights as missing:
            if not self.settings.random_init:
                record.state, record.message, record.fix = "unavailable", str(missing), missing.fix_command
                log.warning("model %s unavailable: %s", record.name, missing)
                return
            checkpoint, record.weights = None, "random-init"
        except store.WeightsError as bad:
            record.state, record.message = "unavailable", str(bad)
            record.fix = f"labelserve weights fetch {record.name} --dir {self.settings.weights_dir}"
            log.error("model %s refused: %s", record.name, bad)
            return
        try:
            if checkpoint is None:
                torch.manual_seed(self.settings.random_seed)
            sam = build_sam(entry.architecture, checkpoint)
            record.model = SamSegmenter(
                record.name,
                sam,
                self.device,
                cache_dtype=getattr(torch, self.settings.cache_dtype),
                cache_on_model_device=self.settings.cache_device == "model",
                encoder_autocast=getattr(torch, self.settings.encoder_dtype),
            )
        except Exception as exc:  # a corrupt checkpoint must not take the server down
            record.state, record.message = "failed", f"loading failed: {exc}"
            record.fix = f"labelserve weights verify {record.name} --dir {self.settings.weights_dir}"
            log.exception("model %s failed to load", record.name)
            return
        record.load_seconds = round(time.perf_counter() - started, 2)
        record.state = "loaded"
        record.fix = None
        record.message = (
            "RANDOM-INIT WEIGHTS: real compute cost, meaningless masks (tests and benchmarks only)"
            if record.weights == "random-init"
            else f"loaded from {checkpoint}"
        )
        log.info(
            "model %s loaded on %s in %.1fs (%s)",
            record.name,
            self.device,
            record.load_seconds,
            record.weights,
        )

    # ---- lookup -------------------------------------------------------------------------------------------
    def record(self, name: str) -> ModelRecord:
        record = self._records.get(name)
        if record is None:
            raise UnknownModel(f"unknown model {name!r}; GET /v1/models lists them: {sorted(self._records)}")
        return record

    def segmenter(self, name: str) -> Segmenter:
        record = self.record(name)
        if record.state == "loaded" and record.model is not None:
            return record.model
        if record.state == "loading":
            raise ModelLoading(f"model {name!r} is still loading; retry in a few seconds")
        raise ModelUnavailable(f"model {name!r} is {record.state}: {record.message}", record.fix)

    def describe(self) -> list[dict]:
        return [record.describe() for record in self._records.values()]

    @property
    def ready(self) -> bool:
        return all(self._records[name].state != "loading" for name in self.settings.models)
