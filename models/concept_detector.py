"""A concept model as a detector with a fixed label set: a vocabulary maps each label to the phrases that find
it, e.g. {"car": ["car", "van"], "person": ["person"]}.

CVAT's detectors declare their labels once (a Nuclio function's spec, an agent's DetectionFunctionSpec) and
a Nuclio request carries only the image and a threshold, so the vocabulary lives on the server (settings) or
in a job's spec. Every label's phrases run in one concept query per image (the image encoded once, each
phrase's text features cached by the model); a label's instances found by several of its phrases are merged
by NMS at the detection IoU. Masks or boxes, by `output`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from models.base import ImageEmbedding
from models.concept import ConceptModel, ConceptParams, Instance
from models.detector import Detector, DetectorInfo, DetectParams
from models.shapes import Shape
from models.vocabulary import check_vocabulary

Output = Literal["mask", "box"]


class ConceptDetector(Detector):
    """`concepts` answering a vocabulary's labels. `embed` gives an image's cached features (the server's
    tiers); without it each image is encoded here."""

    def __init__(
        self,
        name: str,
        concepts: ConceptModel,
        vocabulary: Mapping[str, Sequence[str]],
        output: Output = "mask",
        embed: Callable[[np.ndarray], ImageEmbedding] | None = None,
    ) -> None:
        self.name = name
        self.concepts = concepts
        self.vocabulary = check_vocabulary(vocabulary)
        self.output = output
        self.embed = embed
        self.info = DetectorInfo(
            name, "segment" if output == "mask" else "detect", dict(enumerate(self.vocabulary))
        )
        # phrase -> the class ids it finds (a phrase may serve several labels)
        self._phrases: dict[str, list[int]] = {}
        for class_id, phrases in enumerate(self.vocabulary.values()):
            for phrase in phrases:
                self._phrases.setdefault(phrase, []).append(class_id)

    def with_vocabulary(self, vocabulary: Mapping[str, Sequence[str]]) -> ConceptDetector:
        """The same model with another label set (a job's)."""
        return ConceptDetector(self.name, self.concepts, vocabulary, self.output, self.embed)

    def with_embed(self, embed: Callable[[np.ndarray], ImageEmbedding]) -> ConceptDetector:
        return ConceptDetector(self.name, self.concepts, self.vocabulary, self.output, embed)

    def detect(self, images: Sequence[np.ndarray], params: DetectParams) -> list[list[Shape]]:
        if not self._phrases:
            raise ValueError(f"{self.name!r} has no vocabulary: no label to find")
        concept_params = ConceptParams(
            score_threshold=params.conf, max_instances=params.max_det, masks=self.output == "mask"
        )
        phrases = list(self._phrases)
        out = []
        for image in images:
            embedding = self.embed(image) if self.embed is not None else self.concepts.encode(image)
            found = self.concepts.find(embedding, phrases, concept_params)
            by_class: dict[int, list[Instance]] = {}
            for phrase, instances in zip(phrases, found, strict=True):
                for class_id in self._phrases[phrase]:
                    if params.classes is None or class_id in params.classes:
                        by_class.setdefault(class_id, []).extend(instances)
            shapes = [
                self._shape(self.info.class_names[class_id], instance)
                for class_id, instances in sorted(by_class.items())
                for instance in _merge(instances, params.iou)
            ]
            shapes.sort(key=lambda s: -(s.score or 0.0))
            out.append(shapes[: params.max_det])
        return out

    def _shape(self, label: str, instance: Instance) -> Shape:
        if instance.mask is not None and not instance.mask.is_empty:
            return Shape("mask", label=label, score=instance.score, mask=instance.mask.tight())
        return Shape("box", label=label, score=instance.score, box=instance.box)


def _merge(instances: list[Instance], iou: float) -> list[Instance]:
    """A label's instances from several phrases, best first, without an instance whose box overlaps (IoU above
    `iou`) a better one that another phrase found: the same object found twice. Instances of one phrase are
    kept as the model gave them, as for a label of one phrase."""
    ranked = sorted(instances, key=lambda i: -i.score)
    if len({i.phrase for i in ranked}) < 2:
        return ranked
    from torchvision.ops import box_iou

    boxes = torch.tensor([i.box for i in ranked], dtype=torch.float32)
    overlaps = box_iou(boxes, boxes)
    kept: list[int] = []
    for k, instance in enumerate(ranked):
        if not any(ranked[j].phrase != instance.phrase and overlaps[j, k] > iou for j in kept):
            kept.append(k)
    return [ranked[k] for k in kept]
