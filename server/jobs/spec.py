"""The job document, and how its source expands into images.

A JobSpec is plain JSON (`model_dump(mode="json")`), so any engine (this process's threads, or a distributed
one) can run the same job. Sources plug in at two points:
- `LISTERS` maps a URL scheme to a function listing a directory-like `source.directory` (local paths, and
  `s3://bucket/prefix`, whose byte reader is server.sources.READERS["s3"]);
- `ENUMERATORS` maps a Source field to its expansion, so a new kind of source (like `manifest`, a CVAT
  `manifest.jsonl`, or `cvat_task`, a CVAT task's frames read through cvat-sdk) is one new optional field
  plus one entry.

A `video` source expands into its frames (probed with PyAV at submit) and is labelled with a multi-object
`tracker`; its outputs are CVAT for video (tracks) or MOT, or any image format frame by frame.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.detector import TILE_DESCRIPTION, TILE_OVERLAP_DESCRIPTION, DetectParams
from server.errors import ApiError
from server.jobs.cvat_spec import CvatTaskOutput, CvatTaskSource
from server.jobs.manifest import manifest_names
from server.jobs.video_source import fetch, probe
from server.objectstore.locations import is_s3_url
from server.objectstore.store import list_s3, store_for
from server.settings import Settings
from server.sources import READERS

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif",
)  # fmt: skip
OutputFormat = Literal["cvat_images", "coco", "yolo", "cvat_video", "mot"]
VIDEO_FORMATS: tuple[str, ...] = ("cvat_video", "mot")  # tracks: video sources only
TRACK_CONF = 0.1  # detector confidence of video jobs unless given: ByteTrack matches low scores too

# (reference the engine reads bytes from, name the image gets in the outputs)
ImageEntry = tuple[str, str]


class FrameRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: int = Field(default=0, ge=0, description="First image (0-based), like CVAT's start_frame.")
    stop: int | None = Field(default=None, ge=0, description="Last image, included (CVAT's stop_frame).")
    step: int = Field(default=1, ge=1, description="Every step-th image from start (CVAT's frame_step).")

    def select(self, entries: list[ImageEntry]) -> list[ImageEntry]:
        return entries[self.start : None if self.stop is None else self.stop + 1 : self.step]


class Source(BaseModel):
    """Where the images are: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    directory: str | None = Field(
        default=None,
        description="A directory searched recursively for jpg/jpeg/png/bmp/tif/tiff/webp files, or an "
        "object-store folder s3://bucket/prefix; sorted by relative path, which is each output name.",
    )
    paths: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Image files; output names are relative to their common folder.",
    )
    urls: list[str] | None = Field(
        default=None, min_length=1, description="Image URLs (http/https/s3); output names are the URL paths."
    )
    manifest: str | None = Field(
        default=None,
        description="A CVAT manifest.jsonl (a local path or s3://bucket/key): its images, in manifest order, "
        "at name + extension relative to the manifest's folder, which are also the output names.",
    )
    frames: FrameRange | None = Field(
        default=None, description="Only these of the source's images (in job order), as CVAT's frame range."
    )
    cvat_task: CvatTaskSource | None = Field(
        default=None, description="A CVAT task's frames; output names are its frame names."
    )
    video: str | None = Field(
        default=None,
        description="A video file (a local path, or an s3:// or http(s) URL, downloaded under the data "
        "directory), decoded with PyAV; its frames are numbered from 0 and named frame_000000, ...; "
        "`frames` picks some of them.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [name for name in ENUMERATORS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(repr(n) for n in ENUMERATORS)}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ENUMERATORS if getattr(self, name) is not None)

    def enumerate(self, settings: Settings) -> list[ImageEntry]:
        """Every image of the source, in job order. Raises ApiError (4xx) when the source is unusable."""
        entries = list(ENUMERATORS[self.kind](getattr(self, self.kind), settings))
        if self.frames is not None:
            entries = self.frames.select(entries)
        if not entries and self.video is not None:
            raise ApiError(400, "source_empty", f"The video {self.video} has no frames in the range given.")
        if not entries:
            raise ApiError(400, "source_empty", f"The source has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return entries


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


class JobSpec(BaseModel):
    """A pre-labeling job: run `detector` over every image of `source`, write `output`."""

    model_config = ConfigDict(extra="forbid")

    source: Source
    detector: str = Field(min_length=1, description="Detector model name.")
    params: Params = Field(default_factory=Params)
    sam_refine: str | None = Field(
        default=None, description="SAM model that refines each detection's box into a mask; none when absent."
    )
    output: Output
    batch_size: int = Field(default=8, ge=1, le=256, description="Images per detector call.")
    tracker: TrackerSpec | None = Field(
        default=None,
        description="Video sources: the multi-object tracker (ByteTrack with ultralytics' defaults when "
        "absent). Their params.conf defaults to 0.1, as in ultralytics' model.track.",
    )

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
        return self.source.cvat_task is not None or self.output.cvat_task is not None

    def secrets(self) -> dict[str, dict[str, str]]:
        """CVAT credentials by place ("source", "output"); the JSON dump of the spec has them redacted."""
        places = {"source": self.source.cvat_task, "output": self.output.cvat_task}
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
        return spec


# -- expansion -------------------------------------------------------------------------------------------


def _list_local(directory: str, _: Settings) -> Iterator[str]:
    """Relative POSIX paths of the image files under `directory`, in no particular order."""
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ApiError(400, "source_not_found", f"The source directory {directory!r} {what}.")
    errors: list[OSError] = []
    for root, _, files in os.walk(directory, onerror=errors.append):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield PurePosixPath(os.path.relpath(os.path.join(root, name), directory)).as_posix()
    if errors:  # a subfolder we cannot read would silently shrink the job
        raise ApiError(400, "source_unreadable", f"Part of the source directory cannot be read: {errors[0]}.")


def _list_s3(directory: str, settings: Settings) -> Iterator[str]:
    return list_s3(directory, settings, IMAGE_EXTENSIONS)


LISTERS: dict[str, Callable[[str, Settings], Iterator[str]]] = {
    "": _list_local,
    "file": _list_local,
    "s3": _list_s3,
}


def _from_directory(directory: str, settings: Settings) -> Iterator[ImageEntry]:
    scheme = urlsplit(directory).scheme.lower() if "://" in directory else ""
    lister = LISTERS.get(scheme)
    if lister is None:
        raise ApiError(400, "unsupported_source", f"Listing {scheme}:// directories is not supported.")
    if scheme in ("", "file"):
        local = unquote(urlsplit(directory).path) if scheme else directory
        for rel in sorted(lister(local, settings)):
            yield os.path.join(local, rel), rel
    else:
        for rel in sorted(lister(directory, settings)):
            name = _output_name(rel, directory)
            yield f"{directory.rstrip('/')}/{name}", name


def _output_name(name: str, source: str) -> str:
    """An object key or manifest name used as an output name: it must stay inside the output directory."""
    if not name or name.startswith("/") or any(s in ("", ".", "..") for s in name.split("/")):
        raise ApiError(
            400,
            "unsafe_name",
            f"The image {name!r} of {source} has an empty, '.' or '..' path segment, which would land "
            "outside the output directory; rename it or leave it out.",
        )
    return name


def _from_manifest(manifest: str, settings: Settings) -> Iterator[ImageEntry]:
    if is_s3_url(manifest):
        lines: Iterable[bytes] = store_for(settings).lines(manifest)
        folder = manifest.rpartition("/")[0]
        for name in manifest_names(lines, manifest):
            yield f"{folder}/{_output_name(name, manifest)}", name
        return
    if "://" in manifest and not manifest.startswith("file://"):
        raise ApiError(
            400, "unsupported_source", f"The manifest {manifest!r} must be a local path or an s3:// URL."
        )
    path = unquote(urlsplit(manifest).path) if manifest.startswith("file://") else manifest
    try:
        with open(path, "rb") as file:
            for name in manifest_names(file, manifest):
                yield os.path.join(os.path.dirname(path), _output_name(name, manifest)), name
    except OSError as exc:
        raise ApiError(
            400, "source_not_found", f"The manifest {manifest!r} cannot be read ({exc.strerror or exc})."
        ) from None


def _from_paths(paths: list[str], _: Settings) -> Iterator[ImageEntry]:
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    for given, path in zip(paths, absolute, strict=True):
        yield given, PurePosixPath(os.path.relpath(path, root)).as_posix()


def _from_urls(urls: list[str], _: Settings) -> Iterator[ImageEntry]:
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme.lower() not in READERS:
            raise ApiError(
                400,
                "unsupported_url",
                f"URL scheme of {url!r} is not supported; use one of {sorted(READERS)}.",
            )
        # Only the path's plain segments: a name never climbs out of the output directory.
        segments = [s for s in unquote(parts.path).split("/") if s not in ("", ".", "..")]
        yield url, "/".join(segments) or parts.hostname or "image"


def _from_cvat_task(task: CvatTaskSource, settings: Settings) -> Iterator[ImageEntry]:
    # The engine expands CVAT sources itself, on the connection it validates labels with; this entry serves
    # any other caller of Source.enumerate().
    from server.jobs import cvat_task

    with cvat_task.Connections(settings) as connections:
        yield from connections.source_frames(task)


def _from_video(video: str, settings: Settings) -> Iterator[ImageEntry]:
    """One entry per frame: (frame number, frame_NNNNNN). A remote video is downloaded afresh."""
    info = probe(fetch(video, settings, refresh=True), video, settings.max_image_pixels)
    for number in range(info.frames):
        yield str(number), f"frame_{number:06d}"


ENUMERATORS: dict[str, Callable[..., Iterator[ImageEntry]]] = {
    "directory": _from_directory,
    "paths": _from_paths,
    "urls": _from_urls,
    "manifest": _from_manifest,
    "cvat_task": _from_cvat_task,
    "video": _from_video,
}
