"""The small interfaces every model backend implements, and the errors the registry raises."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
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
    """What the image encoder produced for one image: a named set of tensors (SAM: one; SAM 2: three), each
    [1, C, h, w] on the cache's device. Immutable, so the cache can share it across threads: nothing writes
    the tensors, and `tensors` is never changed after construction."""

    tensors: Mapping[str, torch.Tensor]
    original_size: tuple[int, int]  # (H, W) of the decoded image
    input_size: tuple[int, int]  # (h, w) of the image inside the encoder's input (SAM 2 stretches: its size)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        """What L1 and the disk tier count: every tensor's bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device) -> ImageEmbedding:
        """The same embedding on `device` (itself when it is there already)."""
        if all(t.device == device for t in self.tensors.values()):
            return self
        moved = {name: t.to(device) for name, t in self.tensors.items()}
        return ImageEmbedding(moved, self.original_size, self.input_size)


def to_cache(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`tensor` in the cache's `dtype` on `device`; float32 instead where float16 would overflow to inf (a
    finite activation beyond 65504): a cached inf would turn every later decode of the image into NaNs."""
    cached = tensor.to(device, dtype)
    if (
        dtype == torch.float16
        and not bool(torch.isfinite(cached).all())
        and bool(torch.isfinite(tensor).all())
    ):
        cached = tensor.to(device, torch.float32)
    if cached.untyped_storage().nbytes() > cached.numel() * cached.element_size():
        cached = cached.clone()  # one image of a batch, not a view that keeps the whole batch alive
    return cached


@dataclass(frozen=True)
class Prompt:
    """Prompts in original-image pixel coordinates."""

    points: np.ndarray  # [N, 2] float32 (x, y); N may be 0
    labels: np.ndarray  # [N] int32: 1 positive, 0 negative
    box: np.ndarray | None = None  # [4] float32 x1, y1, x2, y2
    mask_input: torch.Tensor | None = None  # [1, 256, 256] low-resolution logits from an earlier decode


@dataclass(frozen=True)
class Decoded:
    low_res_logits: torch.Tensor  # [M, 256, 256] float32 on the CPU (SAM at 1024 px: 256 = 1024 / 4)
    scores: np.ndarray  # [M] predicted IoU


def cuda_autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The encoders' autocast on CUDA (None: full precision, and always on the CPU)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


class ImageEncoder(ABC):
    """The expensive half of a model whose image features are cached (services/embeddings/): SAM's and SAM 2's
    image encoder for clicks, SAM 3's vision backbone for concepts. Encoded once per image, kept in L1/L2."""

    name: str
    # The architecture tag of its cached embeddings (weights/manifest.json): an L2 entry written under
    # another tag is never read, whatever its key.
    architecture: str = ""
    # Bumped whenever preprocessing changes, so stale cached embeddings are never reused.
    preprocessing_version: str
    # What encode() returns its tensors as (to_cache: float32 where float16 would overflow); embeddings read
    # back from a shared cache tier are put on `cache_device` too.
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

    @property
    def queue_name(self) -> str:
        """Its encode queue's name (services/embeddings/scheduler.py): the model's, unless one model has two
        encoders (SAM 3: concepts and clicks)."""
        return self.name

    def shared_pass(
        self, embedding: ImageEmbedding
    ) -> tuple[ImageEmbedding, list[tuple[ImageEncoder, ImageEmbedding]]]:
        """What encode() returned, split into this encoder's own embedding and the embeddings of sibling
        encoders that the same backbone pass produced (SAM 3's concept encode also yields its click features),
        which the cache then holds under each sibling's own key. The default: all of it is its own."""
        return embedding, []

    def siblings(self) -> tuple[ImageEncoder, ...]:
        """The other encoders of the same model (forgotten with it when it is unloaded)."""
        return ()

    def per_image(
        self,
        maps: Mapping[str, torch.Tensor],
        original_sizes: list[tuple[int, int]],
        input_size: tuple[int, int],
    ) -> list[ImageEmbedding]:
        """A batch's named feature maps ([B, ...] each) as one cached embedding per image, in to_cache's
        dtype and on cache_device."""
        return [
            ImageEmbedding(
                {
                    name: to_cache(level[i : i + 1], self.cache_dtype, self.cache_device)
                    for name, level in maps.items()
                },
                original_size=size,
                input_size=input_size,
            )
            for i, size in enumerate(original_sizes)
        ]


class Segmenter(ImageEncoder):
    """A promptable segmenter split into an expensive encode and a cheap decode (SAM's design)."""

    @abstractmethod
    def decode(self, embedding: ImageEmbedding, prompt: Prompt, multimask: bool) -> Decoded:
        """Run the prompt encoder and mask decoder on a cached embedding."""

    def decode_boxes(self, embedding: ImageEmbedding, boxes: np.ndarray, multimask: bool) -> list[Decoded]:
        """One Decoded per box of `boxes` ([B, 4] float32 x1, y1, x2, y2, original pixels), each box alone as
        the prompt. Backends whose decoder takes a batch of prompts override this with one pass per chunk."""
        no_points = np.zeros((0, 2), np.float32), np.zeros(0, np.int32)
        return [self.decode(embedding, Prompt(*no_points, box=box), multimask) for box in boxes]

    def as_mask_prompt(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Decoded logits as a later decode's mask prompt (refinement); SAM 2 clamps them, as its predictor
        does. Masks are always upsampled from the unchanged logits."""
        return low_res_logits

    @abstractmethod
    def upsample(self, embedding: ImageEmbedding, low_res_logits: torch.Tensor) -> RegionMask:
        """Full-resolution binary mask of one [256, 256] logit map."""

    @abstractmethod
    def low_res_from_mask(self, embedding: ImageEmbedding, mask: RegionMask) -> torch.Tensor:
        """Turn a full-resolution binary mask into [1, 256, 256] logits usable as a mask prompt."""
