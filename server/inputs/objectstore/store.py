"""Reading, listing and writing objects through the storage profiles of one Settings.

Downloaded bytes are cached by (profile, bucket, key, version) together with their ETag. A cache hit is
revalidated with a conditional GET (`If-None-Match`: 304 keeps the bytes, 200 brings the new ones), unless it
was checked less than `s3_revalidate_after_s` ago; an object read by version id never changes and is never
revalidated. Embeddings stay keyed by a hash of the bytes, so one image under two keys is embedded once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from starlette.concurrency import run_in_threadpool

from server.errors import ApiError
from server.inputs.objectstore.clients import Purpose, api_error, make_client
from server.inputs.objectstore.locations import S3Url, parse_s3_url, profile_for
from server.lru import ByteLRU
from server.settings import Settings

MULTIPART_THRESHOLD = 64 * 1024**2  # B2 takes single PUTs up to 5 GB; parts must be 5 MB or more
WRITE_CHECK_NAME = ".labelserve-write-check"


@dataclass(frozen=True)
class CachedObject:
    etag: str
    data: bytes
    checked_at: float  # time.monotonic() of the last answer from the store


class ObjectStore:
    """Thread-safe. One boto3 client per (profile, purpose), made on first use; one byte cache."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache: ByteLRU[CachedObject] = ByteLRU(settings.s3_cache_bytes, lambda o: len(o.data))
        self._clients: dict[tuple[str, Purpose], Any] = {}
        self._lock = threading.Lock()

    def client(self, profile: str, purpose: Purpose) -> Any:
        with self._lock:
            client = self._clients.get((profile, purpose))
            if client is None:
                try:
                    client = make_client(self.settings.storage_profiles[profile], self.settings, purpose)
                except OSError as exc:  # the profile's secret_file
                    raise ApiError(
                        503,
                        "s3_misconfigured",
                        f"The secret file of storage profile {profile!r} cannot be read "
                        f"({exc.strerror or exc}).",
                    ) from None
                self._clients[(profile, purpose)] = client
            return client

    def read(self, url: str, purpose: Purpose = "interactive") -> bytes:
        """The object's bytes (ApiError 4xx/5xx otherwise). Jobs read each image once, so their reads use the
        cache but do not fill it with objects nobody clicks on."""
        location = parse_s3_url(url)
        profile, _ = profile_for(location, self.settings)
        cache_key = (profile, location.bucket, location.key, location.version_id)
        cached = self.cache.get(cache_key)
        if cached is not None and (
            location.version_id or time.monotonic() - cached.checked_at < self.settings.s3_revalidate_after_s
        ):
            return cached.data
        request = {"Bucket": location.bucket, "Key": location.key}
        if location.version_id:
            request["VersionId"] = location.version_id
        if cached is not None:
            request["IfNoneMatch"] = cached.etag
        try:
            response = self.client(profile, purpose).get_object(**request)
            data = self._body(response, location)
        except ClientError as exc:
            if cached is not None and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 304:
                self.cache.put(cache_key, CachedObject(cached.etag, cached.data, time.monotonic()))
                return cached.data
            raise api_error(exc, str(location), profile, self.settings, purpose) from None
        except BotoCoreError as exc:
            raise api_error(exc, str(location), profile, self.settings, purpose) from None
        if purpose == "interactive" or cached is not None:
            self.cache.put(cache_key, CachedObject(response["ETag"], data, time.monotonic()))
        return data

    def _body(self, response: dict, location: S3Url) -> bytes:
        limit = self.settings.max_request_bytes
        if response["ContentLength"] > limit:
            response["Body"].close()
            raise ApiError(
                413, "image_too_large", f"{location} is {response['ContentLength']} bytes, over {limit}."
            )
        return response["Body"].read()

    def lines(self, url: str) -> Iterator[bytes]:
        """The object's lines, streamed (a CVAT manifest of a million images is ~150 MB)."""
        location = parse_s3_url(url)
        profile, _ = profile_for(location, self.settings)
        try:
            response = self.client(profile, "job").get_object(Bucket=location.bucket, Key=location.key)
            yield from response["Body"].iter_lines()
        except (ClientError, BotoCoreError) as exc:
            raise api_error(exc, str(location), profile, self.settings, "job") from None

    def list_keys(self, url: str, suffixes: tuple[str, ...]) -> Iterator[str]:
        """Keys under the folder `s3://bucket/prefix` ending in one of `suffixes` (any case), relative to
        the folder."""
        folder = parse_s3_url(url, folder=True)
        profile, _ = profile_for(folder, self.settings)
        paginator = self.client(profile, "job").get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=folder.bucket, Prefix=folder.key):
                for item in page.get("Contents", ()):
                    if item["Key"].lower().endswith(suffixes):
                        yield item["Key"][len(folder.key) :]
        except (ClientError, BotoCoreError) as exc:
            raise api_error(exc, str(folder), profile, self.settings, "job") from None

    def browse(self, url: str, cursor: str | None = None, limit: int = 200) -> dict[str, Any]:
        """One page of what lies directly under the prefix `s3://bucket/prefix` ("folders" end in "/"), as
        the web console browses a bucket: at most `limit` entries (folders and objects together, as S3's
        MaxKeys counts them) and `next`, the cursor of the following page (None after the last). The prefix
        is taken literally (no "/" is added), so a profile's `prefix` such as "task-" can be listed."""
        folder = parse_s3_url(url, folder=True)  # the bucket name and the "."/".." checks
        prefix = url[len("s3://") :].partition("/")[2].lstrip("/")
        location = S3Url(folder.bucket, prefix)
        profile, _ = profile_for(location, self.settings)
        request: dict[str, Any] = {
            "Bucket": location.bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": limit,
        }  # fmt: skip
        if cursor:
            request["ContinuationToken"] = cursor
        try:
            page = self.client(profile, "interactive").list_objects_v2(**request)
        except (ClientError, BotoCoreError) as exc:
            raise api_error(exc, str(location), profile, self.settings, "interactive") from None
        base = f"s3://{location.bucket}/"
        return {
            "url": str(location),
            "profile": profile,
            "folders": [base + entry["Prefix"] for entry in page.get("CommonPrefixes", ())],
            "objects": [
                {
                    "url": base + item["Key"],
                    "name": item["Key"][len(prefix) :],
                    "size": item["Size"],
                    "modified": item["LastModified"].isoformat(),
                }
                for item in page.get("Contents", ())
                if item["Key"] != prefix
            ],
            "next": page.get("NextContinuationToken") if page.get("IsTruncated") else None,
        }

    def check_writable(self, url: str) -> None:
        """Prove at submit time that a job's output folder can be written, rather than after hours of work:
        writes an empty marker object (left in place, so no delete permission is needed)."""
        folder = parse_s3_url(url, folder=True)
        profile, _ = profile_for(folder, self.settings)
        try:
            self.client(profile, "job").put_object(
                Bucket=folder.bucket, Key=folder.key + WRITE_CHECK_NAME, Body=b""
            )
        except (ClientError, BotoCoreError) as exc:
            raise api_error(exc, str(folder), profile, self.settings, "job") from None

    def upload_tree(
        self, directory: Path, url: str, multipart_threshold: int = MULTIPART_THRESHOLD
    ) -> list[str]:
        """Upload every file under `directory` to the folder `url`, files in subfolders first, so that the
        top-level file of an output (annotations.*, data.yaml) appearing means the rest is there."""
        folder = parse_s3_url(url, folder=True)
        profile, _ = profile_for(folder, self.settings)
        client = self.client(profile, "job")
        files = sorted(
            (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()),
            key=lambda name: ("/" not in name, name),
        )
        # s3transfer follows the client's checksum settings, so multipart parts carry no checksum headers.
        transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold
        )
        for name in files:
            target = S3Url(folder.bucket, folder.key + name)
            try:
                client.upload_file(str(directory / name), target.bucket, target.key, Config=transfer)
            except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
                # upload_file re-raises the store's ClientError as an S3UploadFailedError made from its text
                cause = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc
                if not isinstance(cause, ClientError | BotoCoreError):
                    raise ApiError(502, "s3_error", f"Uploading {target} failed: {exc}.") from None
                raise api_error(cause, str(target), profile, self.settings, "job") from None
        return [str(S3Url(folder.bucket, folder.key + name)) for name in files]


_stores: dict[int, tuple[Settings, ObjectStore]] = {}
_stores_lock = threading.Lock()


def store_for(settings: Settings) -> ObjectStore:
    """The ObjectStore of this Settings object (normally the one of the process; tests make several)."""
    with _stores_lock:
        # The Settings object is kept alive with its store, so its id cannot be reused by another one.
        entry = _stores.get(id(settings))
        if entry is None:
            entry = _stores[id(settings)] = (settings, ObjectStore(settings))
        return entry[1]


async def read_s3(url: str, settings: Settings, purpose: Purpose = "interactive") -> bytes:
    """The READERS["s3"] entry: boto3 is blocking, so it runs on the worker threads."""
    return await run_in_threadpool(store_for(settings).read, url, purpose)


def list_s3(url: str, settings: Settings, suffixes: tuple[str, ...]) -> Iterator[str]:
    return store_for(settings).list_keys(url, suffixes)
