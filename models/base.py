"""The small interfaces every model backend implements, and the errors the registry raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.shapes import RegionMask


class ModelError(Exception):
    """Base of the errors a model lookup can raise; the HTTP layer maps each to a status."""


class UnknownModel(ModelError):
    pass


class ModelUnavailable(ModelError):
    """Weights missing or failed to load; `fix` is what the operator should run."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class ModelLoading(ModelError):
    pass


UNLOADED = "unloaded through the API"


def unloaded(model: str) -> ModelUnavailable:
    """What work arriving for a model after an admin unloaded it is told."""
    return ModelUnavailable(f"model {model!r} was {UNLOADED}", load_command(model))


def load_command(model: str) -> str:
    return f"POST /v1/models/{model}/load (admin scope)"


@dataclass(frozen=True)
class ImageEmbedding:
    """What the image encoder produced for one image; immutable so the cache can share it across threads."""

    features: torch.Tensor  # [1, C, h, w] in the cache's dtype and device
    original_size: tuple[int, int]  # (H, W) of the decoded image
    input_size: tuple[int, int]  # (h, w) after resizing the longest side to the encoder's size

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


@dataclass(frozen=True)
class Prompt:
    """Prompts in original-image pixel coordinates."""

    points: np.ndarray  # [N, 2] float32 (x, y); N may be 0
    labels: np.ndarray  # [N] int32: 1 positive, 0 negative
    box: np.ndarray | None = None  # [4] float32 x1, y1, x2, y2
    mask_input: torch.Tensor | None = None  # [1, 256, 256] low-resolution logits from an earlier decode


@dataclass(frozen=True)
class Decoded:
    low_res_logits: torch.Tensor  # [M, 256, 256] float32 on the CPU
    scores: np.ndarray  # [M] predicted IoU


class Segmenter(ABC):
    """A promptable segmenter split into an expensive encode and a cheap decode (SAM's design)."""

    name: str
    # Bumped whenever preprocessing changes, so stale cached embeddings are never reused.
    preprocessing_version: str
    # What encode() returns its features as; embeddings read back from a shared cache tier are put there too.
    cache_dtype: torch.dtype = torch.float16
    cache_device: torch.device = torch.device("cpu")

    @abstractmethod
    def encode(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an RGB uint8 image [H, W, 3]."""

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """Encode several images; backends that can run them in one pass override this."""
        return [self.encode(image) for image in images]

    def prepare(self, image: np.ndarray) -> Any:
        """The CPU-side preprocessing of encode() (resizing), run on the requesting thread so that the one
        encoder thread per model only feeds the accelerator. The default prepares nothing."""
        return image

    def encode_prepared(self, prepared: list[Any]) -> list[ImageEmbedding]:
        """encode_batch() of what prepare() returned."""
        return self.encode_batch(prepared)

    @abstractmethod
    def decode(self, embedding: ImageEmbedding, prompt: Prompt, multimask: bool) -> Decoded:
        """Run the prompt encoder and mask decoder on a cached embedding."""

    @abstractmethod
    def upsample(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        """Full-resolution binary mask of one [256, 256] logit map."""

    @abstractmethod
    def low_res_from_mask(self, embedding: ImageEmbedding, mask: RegionMask) -> torch.Tensor:
        """Turn a full-resolution binary mask into [1, 256, 256] logits usable as a mask prompt."""
