"""Request and response bodies of the HTTP API (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from models.concept import MAX_EXEMPLARS, MAX_PHRASE_CHARS, MAX_PHRASES
from models.detector import TILE_DESCRIPTION, TILE_OVERLAP_DESCRIPTION
from server.formats.api_json import MASK_FORMATS
from server.inputs.urls import ImageRef


class MaskPrompt(BaseModel):
    """A previous mask used as a prompt, as CVAT RLE (+ inclusive bbox) or COCO RLE."""

    cvat: list[float] | None = Field(
        default=None, description="CVAT mask points: RLE runs + [xtl, ytl, xbr, ybr]."
    )
    coco_rle: dict | None = Field(default=None, description='COCO RLE {"size": [h, w], "counts": ...}.')

    @model_validator(mode="after")
    def _exactly_one(self) -> MaskPrompt:
        if (self.cvat is None) == (self.coco_rle is None):
            raise ValueError("give exactly one of 'cvat' or 'coco_rle'")
        return self


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: ImageRef


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(
        default=None, description="The image; or give `image_id` of an embedded one."
    )
    image_id: str | None = Field(
        default=None, description="sha256 of the image bytes, as returned by /embed."
    )
    points: list[tuple[float, float]] = Field(
        default_factory=list, description="Clicks [[x, y], ...] in pixels."
    )
    labels: list[int] | None = Field(
        default=None, description="1 = positive, 0 = negative, one per point; omitted = all positive."
    )
    box: tuple[float, float, float, float] | None = Field(
        default=None, description="[x1, y1, x2, y2] in pixels."
    )
    boxes: list[tuple[float, float, float, float]] | None = Field(
        default=None,
        description="Several boxes [[x1, y1, x2, y2], ...], decoded in one batch against the image's one "
        "embedding: `masks` holds one mask per box, in their order (each box's best when "
        "multimask_output is true). Alone: not with points, box or mask_input; at most "
        "LABELSERVE_SAM_MAX_BOXES.",
    )
    mask_input: MaskPrompt | None = None
    multimask_output: bool | None = Field(
        default=None,
        description="Ask SAM for 3 candidate masks; default: only for a single click with no box.",
    )
    max_masks: int = Field(default=1, ge=1, le=3, description="Return the best N masks, best first.")
    refine: bool = Field(
        default=True, description="Reuse the logits of an earlier decode whose prompts this one extends."
    )
    formats: list[str] = Field(default=["cvat"], description=f"Mask encodings among {list(MASK_FORMATS)}.")
    polygon_tolerance: float | None = Field(
        default=None, ge=0, le=100, description="Pixels; default from settings."
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        unknown = sorted(set(formats) - set(MASK_FORMATS))
        if unknown:
            raise ValueError(f"unknown mask formats {unknown}; choose among {list(MASK_FORMATS)}")
        return formats

    @model_validator(mode="after")
    def _one_image(self, info: ValidationInfo) -> SegmentRequest:
        uploaded = bool(info.context and info.context.get("upload"))
        if (self.image is not None) + (self.image_id is not None) + uploaded != 1:
            raise ValueError("give exactly one image: 'image', 'image_id', or (multipart) a 'file' part")
        return self


CACHE_TIER_DOC = (
    "Where the embedding came from: l1 (this process's cache), l2 (Redis or disk), or encode (computed now)."
)


class EmbedResponse(BaseModel):
    image_id: str
    model: str
    width: int
    height: int
    cached: bool = Field(description="No encode was needed (the embedding came from a cache tier).")
    cache_tier: Literal["l1", "l2", "encode"] = Field(description=CACHE_TIER_DOC)
    timings_ms: dict[str, float]


class MaskOut(BaseModel):
    score: float
    bbox: list[int] = Field(description="[x, y, width, height] of the mask's pixels.")
    area: int
    cvat: list[int] | None = None
    coco_rle: dict | None = None
    polygons: list[list[float]] | None = None


class SegmentResponse(BaseModel):
    image_id: str
    model: str
    width: int
    height: int
    cached: bool
    cache_tier: Literal["l1", "l2", "encode"] = Field(description=CACHE_TIER_DOC)
    refined_from_points: int | None = Field(
        description="Size of the earlier prompt set whose logits were reused."
    )
    masks: list[MaskOut]
    timings_ms: dict[str, float]


DETECT_FORMATS = ("internal", "cvat", "coco", "yolo")


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(
        default=None, description="The image (JSON); multipart sends it as 'file'."
    )
    conf: float = Field(default=0.25, ge=0.0, le=1.0, description="Minimum confidence.")
    iou: float = Field(default=0.7, ge=0.0, le=1.0, description="NMS IoU threshold.")
    classes: list[int] | None = Field(default=None, description="Keep only these class ids.")
    imgsz: int = Field(default=640, ge=32, le=4096, description="Inference size (long side), in pixels.")
    max_det: int = Field(default=300, ge=1, le=3000)
    tile: int | None = Field(default=None, ge=64, le=8192, description=TILE_DESCRIPTION)
    tile_overlap: float = Field(default=0.2, ge=0.0, le=0.9, description=TILE_OVERLAP_DESCRIPTION)
    sam_refine: str | None = Field(default=None, description="A SAM model that turns each box into a mask.")
    format: str = Field(default="internal", description=f"One of {list(DETECT_FORMATS)}.")
    mask_formats: list[str] = Field(
        default=["cvat", "polygons"],
        description=f"Mask encodings of the internal format, among {list(MASK_FORMATS)}.",
    )
    polygon_tolerance: float | None = Field(default=None, ge=0, le=100)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in DETECT_FORMATS:
            raise ValueError(f"unknown format {value!r}; choose among {list(DETECT_FORMATS)}")
        return value

    @field_validator("mask_formats")
    @classmethod
    def _known_mask_formats(cls, formats: list[str]) -> list[str]:
        return SegmentRequest._known_formats(formats)

    @model_validator(mode="after")
    def _one_image(self, info: ValidationInfo) -> DetectRequest:
        uploaded = bool(info.context and info.context.get("upload"))
        if (self.image is not None) + uploaded != 1:
            raise ValueError("give exactly one image: 'image', or (multipart) a 'file' part")
        return self


class TrackShape(BaseModel):
    """A shape as CVAT's trackers exchange them: a rectangle [x1, y1, x2, y2], a polygon [x, y, ...], or a
    mask (CVAT RLE + inclusive [xtl, ytl, xbr, ybr]), in pixel-edge coordinates."""

    type: str = Field(description="rectangle, polygon or mask")
    points: list[float]


def _one_image(image: ImageRef | None, info: ValidationInfo) -> None:
    uploaded = bool(info.context and info.context.get("upload"))
    if (image is not None) + uploaded != 1:
        raise ValueError("give exactly one image: 'image', or (multipart) a 'file' part")


class TrackStartRequest(BaseModel):
    """Start following objects on a frame; the reply holds one state id per shape."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(default=None, description="The frame the shapes are drawn on.")
    shapes: list[TrackShape] = Field(min_length=1)

    @model_validator(mode="after")
    def _image(self, info: ValidationInfo) -> TrackStartRequest:
        _one_image(self.image, info)
        return self


class TrackStepRequest(BaseModel):
    """The next frame, and the state ids of the objects to find on it."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(default=None, description="The next frame of the same video.")
    states: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _image(self, info: ValidationInfo) -> TrackStepRequest:
        _one_image(self.image, info)
        return self


class PropagateRequest(BaseModel):
    """Follow shapes drawn on frame `start` of a video through the next frames, streamed back as they come."""

    model_config = ConfigDict(extra="forbid")

    video: ImageRef | None = Field(default=None, description="The video file (mp4, mkv, webm, avi, ...).")
    shapes: list[TrackShape] = Field(min_length=1, description="The objects on frame `start`.")
    start: int = Field(default=0, ge=0, description="The frame the shapes are drawn on.")
    stop: int | None = Field(
        default=None, ge=1, description="Last frame + 1; the end of the video if absent."
    )

    @model_validator(mode="after")
    def _video(self, info: ValidationInfo) -> PropagateRequest:
        _one_image(self.video, info)
        if self.stop is not None and self.stop <= self.start:
            raise ValueError("stop must be greater than start")
        return self


class VideoFrameRequest(BaseModel):
    """One frame of a short video, as a PNG: what a client that cannot decode the video steps through."""

    model_config = ConfigDict(extra="forbid")

    video: ImageRef | None = Field(default=None, description="The video file (mp4, mkv, webm, avi, ...).")
    frame: int = Field(default=0, ge=0, description="The frame's number, from 0, in presentation order.")

    @model_validator(mode="after")
    def _video(self, info: ValidationInfo) -> VideoFrameRequest:
        _one_image(self.video, info)
        return self


class ConceptExample(BaseModel):
    """One object shown by clicks and/or a box, as /v1/sam/{model}/segment takes them."""

    model_config = ConfigDict(extra="forbid")

    points: list[tuple[float, float]] = Field(
        default_factory=list, description="Clicks [[x, y], ...] in pixels on (and around) the object."
    )
    labels: list[int] | None = Field(
        default=None, description="One per point: 1 on the object, 0 off it; default: all 1."
    )
    box: tuple[float, float, float, float] | None = Field(
        default=None, description="A box [x1, y1, x2, y2] around the object."
    )


class ConceptRequest(BaseModel):
    """Find every instance of one or more noun phrases (SAM 3's promptable concept segmentation)."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(
        default=None, description="The image; or give `image_id` of one whose features are cached."
    )
    image_id: str | None = Field(
        default=None,
        description="sha256 of the image bytes, as an earlier /v1/concepts reply or a prefetch returned.",
    )
    text: list[str] = Field(
        default_factory=list,
        description=f'Noun phrases, one query each (e.g. ["car", "yellow bus"]): 1 to {MAX_PHRASES}, each '
        f"1 to {MAX_PHRASE_CHARS} characters. A bare string is one phrase. May be left out when a positive "
        "exemplar (positive_boxes or example) is given: the query is then the exemplars alone, under the "
        'phrase "visual" (as Sam3Processor does).',
    )
    example: ConceptExample | None = Field(
        default=None,
        description="Click one, find all: clicks and/or a box on one object. The model's click head segments "
        "it (as /v1/sam/{model}/segment would, on the same cached image) and the box of that mask becomes "
        "one more positive exemplar; the reply's `example` gives that box. Only for a model with a click "
        "head.",
    )
    positive_boxes: list[tuple[float, float, float, float]] = Field(
        default_factory=list,
        description="Exemplar boxes [[x1, y1, x2, y2], ...] in pixels of instances like the ones "
        "wanted; they apply to every phrase.",
    )
    negative_boxes: list[tuple[float, float, float, float]] = Field(
        default_factory=list,
        description="Exemplar boxes of what is not wanted; with positive_boxes at most "
        f"{MAX_EXEMPLARS} in all.",
    )
    score_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Keep instances scoring above this (detection × presence)."
    )
    mask_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="A pixel is in a mask where its probability is above this."
    )
    max_instances: int = Field(
        default=100, ge=1, le=1000, description="Most instances per phrase, highest scores first."
    )
    nms_iou: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Per-phrase non-maximum suppression of the boxes at this IoU; absent: none.",
    )
    masks: bool = Field(default=True, description="false: boxes and scores only (no mask is computed).")
    formats: list[str] = Field(default=["cvat"], description=f"Mask encodings among {list(MASK_FORMATS)}.")
    polygon_tolerance: float | None = Field(
        default=None, ge=0, le=100, description="Pixels; default from settings."
    )

    @field_validator("text", mode="before")
    @classmethod
    def _phrases(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        return SegmentRequest._known_formats(formats)

    @model_validator(mode="after")
    def _one_image(self, info: ValidationInfo) -> ConceptRequest:
        uploaded = bool(info.context and info.context.get("upload"))
        if (self.image is not None) + (self.image_id is not None) + uploaded != 1:
            raise ValueError("give exactly one image: 'image', 'image_id', or (multipart) a 'file' part")
        return self


class ConceptMask(BaseModel):
    bbox: list[int] = Field(description="[x, y, width, height] of the mask's pixels.")
    area: int
    cvat: list[int] | None = None
    coco_rle: dict | None = None
    polygons: list[list[float]] | None = None


class ConceptInstance(BaseModel):
    prompt: str = Field(description="The phrase that found it.")
    score: float
    box: list[float] = Field(
        description="[x1, y1, x2, y2] in pixels, the detector's box clipped to the image."
    )
    mask: ConceptMask | None = Field(default=None, description="Absent when the request asked for no masks.")


class ConceptExampleFound(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2]: the exemplar box, the mask's bounds in pixels.")
    score: float = Field(description="The click head's predicted IoU of the mask.")


class ConceptResponse(BaseModel):
    image_id: str
    model: str
    width: int
    height: int
    cached: bool
    cache_tier: Literal["l1", "l2", "encode"] = Field(description=CACHE_TIER_DOC)
    instances: list[ConceptInstance] = Field(description="Every phrase's instances, by phrase, best first.")
    counts: dict[str, int] = Field(description="Instances found per phrase.")
    example: ConceptExampleFound | None = Field(
        default=None, description="With `example`: the object it segmented, whose box was the exemplar."
    )
    timings_ms: dict[str, float]
