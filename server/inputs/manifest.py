"""CVAT's dataset manifest (`manifest.jsonl`, versions 1.0 and 1.1) as a job source.

The first line is {"version": ...}, the second {"type": "images"} (video manifests are refused), then one
image per line: {"name": "sub/dir/image1", "extension": ".jpg", "width": ..., "height": ..., ...}. As in
CVAT (`_create_task_manifest_based_on_cloud_storage_manifest`), an image's key is the manifest's folder
joined with name + extension, so names are relative to the manifest's own folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from server.errors import ApiError

VERSIONS = ("1.0", "1.1")


def manifest_names(lines: Iterable[bytes | str], where: str) -> Iterator[str]:
    """`name + extension` of each image, in manifest order. ApiError 400 on anything that is not an images
    manifest, naming the line."""
    header: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise _bad(where, number, "is not JSON") from None
        if not isinstance(record, dict):
            raise _bad(where, number, "is not a JSON object")
        if len(header) < 2:
            header.append(record)
            _check_header(header, where, number)
            continue
        name, extension = record.get("name"), record.get("extension", "")
        if not isinstance(name, str) or not name or not isinstance(extension, str):
            raise _bad(where, number, 'has no "name" (and "extension") of an image')
        yield name + extension
    if len(header) < 2:
        raise ApiError(400, "bad_manifest", f"{where} is not a CVAT manifest: it ends before its header.")


def _check_header(header: list[dict], where: str, number: int) -> None:
    if len(header) == 1 and str(header[0].get("version")) not in VERSIONS:
        raise _bad(where, number, f"is not a manifest version line (one of {', '.join(VERSIONS)})")
    if len(header) == 2 and header[1].get("type") != "images":
        kind = header[1].get("type")
        if kind == "video":
            raise ApiError(400, "bad_manifest", f"{where} is a video manifest; jobs take image manifests.")
        raise _bad(where, number, 'is not {"type": "images"}')


def _bad(where: str, number: int, problem: str) -> ApiError:
    return ApiError(400, "bad_manifest", f"Line {number} of the CVAT manifest {where} {problem}.")
