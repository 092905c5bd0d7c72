"""Automatic refinement: a click that extends an earlier prompt set on the same image reuses that decode's
low-resolution logits as SAM's mask input, as SAM's authors recommend for iterative correction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.lru import ByteLRU

# Clicks are compared at 1/100 pixel so that float noise from a client's zoom level does not matter.
_PRECISION = 2


@dataclass(frozen=True)
class PromptKey:
    points: frozenset[tuple[float, float, int]]
    box: tuple[float, ...] | None

    @classmethod
    def of(cls, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None) -> PromptKey:
        return cls(
            frozenset(
                (round(float(x), _PRECISION), round(float(y), _PRECISION), int(label))
                for (x, y), label in zip(points, labels, strict=True)
            ),
            None if box is None else tuple(round(float(v), _PRECISION) for v in box),
        )

    def extends(self, earlier: PromptKey) -> bool:
        return self.box == earlier.box and earlier.points < self.points


@dataclass(frozen=True)
class _Decode:
    key: PromptKey
    logits: torch.Tensor  # [1, 256, 256] of the best mask


class RefinementHistory:
    """The last few decodes per (model, image), byte-bounded across all images."""

    def __init__(self, max_bytes: int, per_image: int = 8) -> None:
        self.per_image = per_image
        self.reused = 0  # decodes that started from earlier logits
        self._lru: ByteLRU[tuple[_Decode, ...]] = ByteLRU(
            max_bytes, lambda decodes: sum(d.logits.numel() * d.logits.element_size() for d in decodes)
        )

    def base_for(self, model: str, image_id: str, key: PromptKey) -> tuple[torch.Tensor, int] | None:
        """Logits of the largest earlier prompt set that `key` extends, and its number of points."""
        decodes = self._lru.get((model, image_id)) or ()
        candidates = [d for d in decodes if key.extends(d.key)]
        if not candidates:
            return None
        best = max(candidates, key=lambda d: len(d.key.points))
        self.reused += 1
        return best.logits, len(best.key.points)

    def record(self, model: str, image_id: str, key: PromptKey, logits: torch.Tensor) -> None:
        with self._lru.lock:
            earlier = tuple(d for d in (self._lru.get((model, image_id)) or ()) if d.key != key)
            decodes = (*earlier[-(self.per_image - 1) :], _Decode(key, logits.detach().clone()))
            self._lru.put((model, image_id), decodes)

    def clear(self) -> int:
        return self._lru.clear()

    def forget(self, model: str) -> int:
        return self._lru.discard_where(lambda key: key[0] == model)

    def snapshot(self) -> dict:
        return {**self._lru.snapshot(), "reused": self.reused}
