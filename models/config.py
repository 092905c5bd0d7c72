"""What the model layer needs from the server's configuration, and nothing else.

The registry takes this small frozen object, not the server's Settings, so that `models/` imports nothing from
`server/` (tests/test_layers.py). `server.settings.Settings.models_config()` builds it. It lives apart from
the registry because building it must not import torch: `labelserve serve` reads its settings before it
re-executes itself under another allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ModelsConfig:
    """The LABELSERVE_* settings the registry and the backends read (same names, same meanings)."""

    models: list[str] = field(default_factory=list)  # LABELSERVE_MODELS: loaded at start
    detector_paths: dict[str, Path] = field(default_factory=dict)  # name -> local ultralytics checkpoint
    weights_dir: Path = Path("weights")
    data_dir: Path = Path("data")  # ultralytics' settings live in data_dir/ultralytics
    device: str = "auto"  # "auto", "cpu" or "cuda"
    torch_threads: int = 0  # 0: all cores
    random_init: bool = False  # build models whose weights are missing with seeded random weights
    random_seed: int = 0
    cache_dtype: str = "float16"  # what a segmenter's encode returns its features as
    cache_device: str = "cpu"  # "cpu", or "model": keep features on the model's device
    encoder_dtype: str = "float16"  # the encoder's CUDA autocast dtype ("float32": none)
    warm_up_batch: int = 4  # a CUDA segmenter is warmed up at this encode batch size while loading
    sam2_memory_frames: int = 6  # recent frames a SAM 2 tracker state remembers
    concept_text_cache_bytes: int = 64 * 2**20  # per concept model: the text features kept per phrase
    concept_vocabulary: dict[str, list[str]] = field(default_factory=dict)  # label -> phrases (detectors)
    concept_output: str = "mask"  # what a concept model answers as a detector: "mask" or "box"


class HasModelsConfig(Protocol):
    """Anything that gives a ModelsConfig: the server's Settings."""

    def models_config(self) -> ModelsConfig: ...
