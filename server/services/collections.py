"""Image collections: a job's (or a prefetch run's) `Source`, and how it expands into images.

Sources plug in at two points:
- `LISTERS` maps a URL scheme to a function listing a directory-like `source.directory` (local paths, and
  `s3://bucket/prefix`, whose byte reader is server.inputs.urls.READERS["s3"]);
- `ENUMERATORS` maps a Source field to its expansion, so a new kind of source (like `manifest`, a CVAT
  `manifest.jsonl`, or `cvat_task`, a CVAT task's frames read through cvat-sdk) is one new optional field
  plus one entry.

A `video` source expands into its frames (probed with PyAV at submit).

Here, not in inputs/: a `cvat_task` source lists a CVAT task's frames through server/cvat/, which itself reads
buckets through inputs/. So collections sit above both, where prefetch and jobs (their two users) reach them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.cvat.spec import CvatTaskSource
from server.errors import ApiError
from server.inputs.manifest import manifest_names
from server.inputs.objectstore.locations import is_s3_url
from server.inputs.objectstore.store import list_s3, store_for
from server.inputs.urls import READERS
from server.inputs.video import fetch, probe
from server.settings import Settings

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif",
)  # fmt: skip
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
    from server.cvat import tasks

    with tasks.Connections(settings) as connections:
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
