"""s3:// URLs, and which storage profile serves them: the bucket allow-list and the profile's key prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.errors import ApiError
from server.settings import Settings, StorageProfile

SCHEME = "s3://"
VERSION_QUERY = "?versionId="
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Url:
    """An object (`key`), or a folder (`key` is a prefix: empty or ending in "/")."""

    bucket: str
    key: str
    version_id: str | None = None

    def __str__(self) -> str:
        version = f"{VERSION_QUERY}{self.version_id}" if self.version_id else ""
        return f"{SCHEME}{self.bucket}/{self.key}{version}"


def is_s3_url(text: str) -> bool:
    return text[: len(SCHEME)].lower() == SCHEME


def parse_s3_url(url: str, *, folder: bool = False) -> S3Url:
    """`s3://bucket/key` (optionally `?versionId=ID`), or with `folder` `s3://bucket[/prefix]`. Keys are taken
    literally, as the AWS CLI does: no percent-decoding."""
    if not is_s3_url(url):
        raise ApiError(400, "bad_s3_url", f"{url!r} is not an s3://bucket/key URL.")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    version_id = None
    if not folder and VERSION_QUERY in key:
        key, _, version_id = key.rpartition(VERSION_QUERY)
    if not BUCKET_NAME.fullmatch(bucket):
        raise ApiError(
            400, "bad_s3_url", f"{url!r} does not start with a valid bucket name (s3://bucket/key)."
        )
    if folder:
        key = key if key in ("", "/") or key.endswith("/") else key + "/"
        key = key.lstrip("/")
    elif not key or key.endswith("/"):
        raise ApiError(400, "bad_s3_url", f"{url!r} names no object: give s3://{bucket}/path/to/image.jpg.")
    # HTTP layers may collapse "a/../b" into "b": a key other than the one checked against the prefix.
    if any(segment in (".", "..") for segment in key.split("/")):
        raise ApiError(400, "bad_s3_url", f"{url!r} has '.' or '..' path segments; give the key itself.")
    return S3Url(bucket, key, version_id or None)


def profile_for(location: S3Url, settings: Settings) -> tuple[str, StorageProfile]:
    """The storage profile whose allow-list has the bucket, after checking its prefix (ApiError 403)."""
    for name, profile in settings.storage_profiles.items():
        if location.bucket in profile.buckets:
            if not location.key.startswith(profile.prefix):
                raise ApiError(
                    403,
                    "s3_key_forbidden",
                    f"{location} is outside the prefix {profile.prefix!r} that storage profile {name!r} "
                    "may reach; give a key under it.",
                )
            return name, profile
    if not settings.storage_profiles:
        raise ApiError(
            403,
            "s3_not_configured",
            "This server has no storage profiles, so it reads no s3:// URLs; the operator sets "
            "LABELSERVE_STORAGE_PROFILES.",
        )
    raise ApiError(
        403,
        "s3_bucket_forbidden",
        f"The bucket {location.bucket!r} is not on this server's allow-list (LABELSERVE_STORAGE_PROFILES).",
    )
