"""The job document. Its source, and how that expands into images, is server/services/collections.py.

A JobSpec is plain JSON (`model_dump(mode="json")`), so any engine (this process's threads, or a distributed
one) can run the same job.

A `video` source expands into its frames (probed with PyAV at submit) and is labelled with a multi-object
`tracker`; its outputs are CVAT for video (tracks) or MOT, or any image format frame by frame.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.detector import TILE_DESCRIPTION, TILE_OVERLAP_DESCRIPTION, DetectParams
from server.cvat.spec import CvatIssuesOutput, CvatNewTask, CvatTaskOutput
from server.formats.annotations import AnnotationFormat
from server.services.collections import Source

OutputFormat = Literal["cvat_images", "coco", "yolo", "cvat_video", "mot", "findings", "ranking"]
VIDEO_FORMATS: tuple[str, ...] = ("cvat_video", "mot")  # tracks: video sources only
TRACK_CONF = 0.1  # detector confidence of video jobs unless given: ByteTrack matches low scores too
# Detector confidence of review jobs unless given: ObjectLab compares with low-confidence boxes too, and a
# class the detector is unsure of would otherwise vanish from its opinion.
REVIEW_CONF = 0.01


class Params(BaseModel):
    """Detector parameters; the same meaning as models.detector.DetectParams."""

    model_config = ConfigDict(extra="forbid")

    conf: float = Field(default=0.25, ge=0.0, le=1.0, description="Minimum detection confidence.")
    iou: float = Field(default=0.7, ge=0.0, le=1.0, description="NMS IoU threshold.")
    classes: list[int] | None = Field(default=None, description="Class ids to keep; all when absent.")
    imgsz: int = Field(default=640, ge=32, le=8192, description="Inference size in pixels.")
    max_det: int = Field(default=300, ge=1, le=10000, description="Most detections per image.")
    tile: int | None = Field(default=None, ge=64, le=8192, description=TILE_DESCRIPTION)
    tile_overlap: float = Field(default=0.2, ge=0.0, le=0.9, description=TILE_OVERLAP_DESCRIPTION)

    def detect_params(self) -> DetectParams:
        return DetectParams.of(self)


class TrackerSpec(BaseModel):
    """Multi-object tracking of a video job's detections with ultralytics' ByteTrack or BoT-SORT (without
    ReID); the defaults are ultralytics' (ultralytics/cfg/trackers/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["bytetrack", "botsort"] = Field(default="bytetrack")
    track_high_thresh: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Detections scoring this or more are matched first."
    )
    track_low_thresh: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Detections scoring between this and track_high_thresh are matched second, to tracks "
        "still unmatched (ByteTrack); lower ones are ignored.",
    )
    new_track_thresh: float = Field(
        default=0.25, ge=0.0, le=1.0, description="An unmatched detection scoring this much starts a track."
    )
    track_buffer: int = Field(
        default=30, ge=0, le=100_000, description="Frames a lost track is kept, to be found again."
    )
    match_thresh: float = Field(
        default=0.8, ge=0.0, le=1.0, description="Largest matching cost (1 - IoU, fused with the score)."
    )
    fuse_score: bool = Field(default=True, description="Fuse detection scores into the matching cost.")
    gmc_method: Literal["sparseOptFlow", "orb", "sift", "ecc", "none"] = Field(
        default="sparseOptFlow", description="BoT-SORT's camera-motion compensation; ignored by ByteTrack."
    )


class Output(BaseModel):
    """Where results go: files (`format` in `directory`), a CVAT task (`cvat_task`), or both."""

    model_config = ConfigDict(extra="forbid")

    format: OutputFormat | None = Field(
        default=None,
        description="cvat_images: annotations.xml (CVAT for images 1.1); coco: annotations.json; "
        "yolo: labels/<name>.txt and data.yaml (ultralytics layout); video sources also: cvat_video: "
        "annotations.xml (CVAT for video 1.1, tracks); mot: gt/gt.txt, gt/labels.txt and seqinfo.ini "
        "(MOTChallenge, as CVAT's MOT 1.1 imports it).",
    )
    directory: str | None = Field(
        default=None,
        min_length=1,
        description="A local directory (created if missing; must be writable), or an object-store folder "
        "s3://bucket/prefix: files are staged under the data directory and uploaded when the job is done.",
    )
    cvat_task: CvatTaskOutput | None = Field(
        default=None, description="Upload into this CVAT task once every image is done."
    )

    @model_validator(mode="after")
    def _destination(self) -> Output:
        if (self.format is None) != (self.directory is None):
            raise ValueError("format and directory go together")
        if self.directory is None and self.cvat_task is None:
            raise ValueError("give format and directory, or cvat_task, or both")
        return self

    def destinations(self) -> list[str]:
        """What two running jobs must not share: the directory, the CVAT task."""
        found = [self.directory] if self.directory is not None else []
        task = self.cvat_task
        if task is not None:
            found.append(f"CVAT task {task.task_id} on {task.url or f'profile {task.profile}'}")
        return found


class ReviewSpec(BaseModel):
    """A review job's annotations: the dataset whose labels are checked against the detector."""

    model_config = ConfigDict(extra="forbid")

    annotations: str | None = Field(
        default=None,
        min_length=1,
        description="The annotations, a local path or s3:// URL: a COCO instances JSON file, a CVAT for "
        "images 1.1 XML file, or a YOLO directory (data.yaml and labels/). Their image names are relative "
        "to the source directory, whose images must all be there. Read once, at submit, and stored with the "
        "job. Absent for the cvat_task format.",
    )
    format: AnnotationFormat | Literal["cvat_task"] = Field(
        description="coco, cvat_images or yolo; or cvat_task: the source CVAT task's current annotations "
        "(source.cvat_task, with source.frames for one job's frames), each finding keeping its CVAT shape id."
    )
    label_mapping: dict[str, str] | None = Field(
        default=None,
        description='Detector class name -> dataset label, where they differ (e.g. {"person": "human"}); '
        "detections of classes mapped to no dataset label are ignored. Absent: the names as they are.",
    )
    max_score: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Findings scoring this or more (1 = no doubt) are left out."
    )
    top_k: int | None = Field(default=None, ge=1, description="Write at most this many findings.")
    thumbnails: int = Field(
        default=200, ge=0, le=10_000, description="report.html pictures the first this many findings."
    )
    cvat_issues: CvatIssuesOutput | None = Field(
        default=None,
        description="Also write the top findings as issues on this CVAT job (its task's frames matched to "
        "the images by name); a rerun adds no duplicates.",
    )
    sam: str | None = Field(
        default=None,
        description="A SAM model: each polygon or mask annotation's box prompts it, and a low IoU between "
        "SAM's mask and the annotated one flags a sloppy edge. Encodes go through the embedding cache, so "
        "right after a pre-labeling job with the same SAM model they cost nothing. None: boxes only.",
    )


class SampleSpec(BaseModel):
    """A sample job: which `budget` images of the source to annotate next."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(ge=1, description="How many images to pick; at most the source's size.")
    uncertainty: Literal["least_confidence", "margin", "entropy"] = Field(
        default="entropy",
        description="Per-box uncertainty from the detector's confidence, averaged per image.",
    )
    prefilter: float = Field(
        default=3.0,
        ge=0.0,
        le=1000.0,
        description="k-center greedy runs among the prefilter x budget most uncertain images; 0: among all.",
    )
    embedding: Literal["sam", "detector"] = Field(
        default="sam",
        description="Each image's vector for diversity: sam, the pooled image embedding of the SAM model "
        "`embeddings` (from the cache when there); or detector, the detector's own features (Ultralytics "
        "YOLO: its second-to-last layer, average-pooled), which need no SAM model.",
    )
    embeddings: str | None = Field(
        default=None,
        min_length=1,
        description="The SAM model of embedding 'sam'.",
    )
    seed: int = Field(default=0, ge=0, description="The first k-center pick; the same seed, the same picks.")

    @model_validator(mode="after")
    def _vectors(self) -> SampleSpec:
        if (self.embedding == "sam") != (self.embeddings is not None):
            raise ValueError("embedding 'sam' needs embeddings (a SAM model); 'detector' takes none")
        return self

    cvat_task: CvatNewTask | None = Field(
        default=None,
        description="Also make a new CVAT task of the picked images, in rank order, from the CVAT cloud "
        "storage of the bucket the pool is in (an s3:// source): no image bytes are copied.",
    )


class JobSpec(BaseModel):
    """A pre-labeling job: run `detector` over every image of `source`, write `output`. With `review`, a
    review job: score the annotations of `review` against the detector's opinion, write the findings."""

    model_config = ConfigDict(extra="forbid")

    source: Source
    detector: str = Field(min_length=1, description="Detector model name.")
    vocabulary: dict[str, list[str]] | None = Field(
        default=None,
        description='A concept detector\'s (SAM 3) labels and the phrases that find them, {"label": '
        '["phrase", ...]}, e.g. {"car": ["car", "van"]}; class ids follow their order. Absent: the server\'s '
        "LABELSERVE_CONCEPT_VOCABULARY.",
    )
    params: Params = Field(default_factory=Params)
    sam_refine: str | None = Field(
        default=None, description="SAM model that refines each detection's box into a mask; none when absent."
    )
    output: Output
    batch_size: int = Field(default=8, ge=1, le=256, description="Images per detector call.")
    engine: Literal["local", "ray"] = Field(
        default="local",
        description="Where the images run: 'local', this process's threads; 'ray', an actor pool on Ray Data "
        "(needs the `ray` extra; results and output are the local engine's, byte for byte).",
    )
    tracker: TrackerSpec | None = Field(
        default=None,
        description="Video sources: the multi-object tracker (ByteTrack with ultralytics' defaults when "
        "absent). Their params.conf defaults to 0.1, as in ultralytics' model.track.",
    )
    review: ReviewSpec | None = Field(
        default=None,
        description="A review job: flag likely label errors in these annotations of the source's images; "
        "output.format must be 'findings'. Its params.conf defaults to 0.01. The detector must not have "
        "been trained on these labels.",
    )

    sample: SampleSpec | None = Field(
        default=None,
        description="A sample job: rank which images to annotate next (uncertainty, then diversity); "
        "output.format must be 'ranking'.",
    )

    @model_validator(mode="after")
    def _sample_settings(self) -> JobSpec:
        ranking = self.output.format == "ranking"
        if self.sample is None:
            if ranking:
                raise ValueError("the ranking format is for sample jobs (give 'sample')")
            return self
        if not ranking or self.output.cvat_task is not None:
            raise ValueError("a sample job writes output.format 'ranking' to output.directory")
        if self.review is not None or self.sam_refine is not None or self.source.video is not None:
            raise ValueError("a sample job takes images, without review or sam_refine")
        return self

    @model_validator(mode="after")
    def _review_settings(self) -> JobSpec:
        findings = self.output.format == "findings"
        if self.review is None:
            if findings:
                raise ValueError("the findings format is for review jobs (give 'review')")
            return self
        if not findings or self.output.cvat_task is not None:
            raise ValueError("a review job writes output.format 'findings' to output.directory")
        from_task = self.review.format == "cvat_task"
        if from_task != (self.source.cvat_task is not None):
            raise ValueError("the cvat_task annotation format goes with a source.cvat_task, and only with it")
        if from_task != (self.review.annotations is None):
            raise ValueError("give review.annotations, except with the cvat_task format")
        if self.source.video is not None:
            raise ValueError("a review job reads images, not a video")
        if self.sam_refine is not None:
            raise ValueError("sam_refine is for pre-labeling jobs")
        if "conf" not in self.params.model_fields_set:
            self.params.conf = REVIEW_CONF
        return self

    @model_validator(mode="after")
    def _video_settings(self) -> JobSpec:
        if self.source.video is None:
            if self.tracker is not None:
                raise ValueError("tracker needs a video source (source.video)")
            if self.output.format in VIDEO_FORMATS:
                raise ValueError(f"the {self.output.format} format needs a video source (source.video)")
            return self
        if self.sam_refine is not None:
            raise ValueError("sam_refine is not supported for video sources")
        if self.output.cvat_task is not None:
            raise ValueError(
                "video jobs write files (import cvat_video into a CVAT video task); uploading tracks into a "
                "CVAT task is not supported"
            )
        if self.tracker is None:
            self.tracker = TrackerSpec()
        if "conf" not in self.params.model_fields_set:
            self.params.conf = TRACK_CONF
        return self

    @model_validator(mode="after")
    def _output_task_defaults_to_the_source(self) -> JobSpec:
        task = self.output.cvat_task
        if task is not None and task.task_id is None:
            if self.source.cvat_task is None:
                raise ValueError(
                    "output.cvat_task needs task_id and a connection unless the source is a CVAT task"
                )
            self.output.cvat_task = task.targeting(self.source.cvat_task)
        return self

    def uses_cvat(self) -> bool:
        return (
            self.source.cvat_task is not None
            or self.output.cvat_task is not None
            or self.issues() is not None
        )

    def issues(self) -> CvatIssuesOutput | None:
        return self.review.cvat_issues if self.review is not None else None

    def new_task(self) -> CvatNewTask | None:
        return self.sample.cvat_task if self.sample is not None else None

    def secrets(self) -> dict[str, dict[str, str]]:
        """CVAT credentials by place ("source", "output", "issues", "new_task"); the JSON dump of the spec
        has them redacted."""
        places = {
            "source": self.source.cvat_task,
            "output": self.output.cvat_task,
            "issues": self.issues(),
            "new_task": self.new_task(),
        }
        return {
            place: task.secrets() for place, task in places.items() if task is not None and task.secrets()
        }

    def with_secrets(self, secrets: dict[str, dict[str, str]]) -> JobSpec:
        """A copy with the credentials `secrets()` gave put back (a stored spec holds redacted ones)."""
        spec = self.model_copy(deep=True)
        if spec.source.cvat_task is not None and "source" in secrets:
            spec.source.cvat_task = spec.source.cvat_task.with_secrets(secrets["source"])
        if spec.output.cvat_task is not None and "output" in secrets:
            spec.output.cvat_task = spec.output.cvat_task.with_secrets(secrets["output"])
        if spec.review is not None and spec.review.cvat_issues is not None and "issues" in secrets:
            spec.review.cvat_issues = spec.review.cvat_issues.with_secrets(secrets["issues"])
        if spec.sample is not None and spec.sample.cvat_task is not None and "new_task" in secrets:
            spec.sample.cvat_task = spec.sample.cvat_task.with_secrets(secrets["new_task"])
        return spec
