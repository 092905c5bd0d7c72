"""The one boto3 client configuration that works on Backblaze B2, and how store errors reach the caller.

B2 rejects the integrity headers boto3 sends by default since 1.36 (`x-amz-checksum-*`, even on GET), and
signs only SigV4 with its own region: see docs/storage-b2.md in the shared notes. Retries are botocore's
"standard" mode with a total attempt budget per purpose: small where a person waits for a click, larger for
jobs. B2 throttles with `503 SlowDown` and a `Retry-After` header, which botocore ignores (it reads only
AWS's `x-amz-retry-after`), so a hook translates it.
"""

from __future__ import annotations

import email.utils
import threading
import time
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from server.errors import ApiError
from server.settings import Settings, StorageProfile

# Whose attempt budget a store call spends: an API request someone waits on, or a batch job.
Purpose = Literal["interactive", "job"]

CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
THROTTLE_ERRORS = {"SlowDown", "ServiceUnavailable", "Throttling", "TooManyRequests", "RequestLimitExceeded"}


def attempts_for(purpose: Purpose, settings: Settings) -> int:
    return settings.s3_interactive_attempts if purpose == "interactive" else settings.s3_job_attempts


def client_config(profile: StorageProfile, settings: Settings, purpose: Purpose) -> Config:
    return Config(
        region_name=profile.region,  # B2 checks the SigV4 region; without it presigned URLs come out SigV2
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "total_max_attempts": attempts_for(purpose, settings)},
        max_pool_connections=settings.s3_max_connections,
        connect_timeout=settings.s3_timeout_s,
        read_timeout=settings.s3_timeout_s,
        user_agent_extra="labelserve",
    )


_session: boto3.session.Session | None = None
_session_lock = threading.Lock()


def make_client(profile: StorageProfile, settings: Settings, purpose: Purpose) -> Any:
    """A new client. Clients are thread-safe once made, but making them is not: hence the lock, around one
    session that keeps the parsed service model (a fresh session re-reads it: ~200 ms per client)."""
    global _session
    secret = profile.secret()
    with _session_lock:
        _session = _session or boto3.session.Session()
        client = _session.client(
            "s3",
            endpoint_url=profile.endpoint_url,
            aws_access_key_id=profile.access_key_id,
            aws_secret_access_key=secret,
            config=client_config(profile, settings, purpose),
        )
    client.meta.events.register_first("needs-retry.s3", honour_retry_after)
    return client


def honour_retry_after(response: tuple[Any, dict] | None = None, **_: object) -> None:
    """Copy an HTTP `Retry-After` (seconds or a date) into the `x-amz-retry-after` (milliseconds) that the
    standard retry handler, which runs next, waits for (at most its own backoff + 5 s)."""
    if response is None:
        return
    headers = response[0].headers
    value = headers.get("Retry-After")
    if value is None or "x-amz-retry-after" in headers:
        return
    seconds = _retry_after_seconds(value)
    if seconds is not None:
        headers["x-amz-retry-after"] = str(int(seconds * 1000))


def _retry_after_seconds(value: str) -> float | None:
    if value.strip().isdigit():
        return float(value)
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def api_error(
    exc: ClientError | BotoCoreError, where: str, profile: str, settings: Settings, purpose: Purpose
) -> ApiError:
    """A store failure as the caller should see it: what failed, and who can fix it. Never the secret."""
    attempts = attempts_for(purpose, settings)
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return ApiError(
            504,
            "s3_timeout",
            f"The object store of storage profile {profile!r} did not answer {where} within "
            f"{settings.s3_timeout_s} s ({attempts} attempts); retry later.",
        )
    if isinstance(exc, EndpointConnectionError):
        return ApiError(
            502, "s3_unreachable", f"Cannot connect to the endpoint of storage profile {profile!r}: {exc}."
        )
    if not isinstance(exc, ClientError):
        return ApiError(
            502, "s3_error", f"Reading {where} through storage profile {profile!r} failed: {exc}."
        )
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code, status = str(error.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)
    said = f"{code}: {error['Message']}" if error.get("Message") else code
    if code == "NoSuchBucket":
        return ApiError(
            404, "s3_not_found", f"The bucket of {where} does not exist (storage profile {profile!r})."
        )
    if status == 404 or code in ("NoSuchKey", "NotFound"):
        return ApiError(404, "s3_not_found", f"There is no object {where}; check the key.")
    if code in CREDENTIAL_ERRORS:
        return ApiError(
            403,
            "s3_credentials",
            f"The object store refused the credentials of storage profile {profile!r} ({code}) for {where}; "
            "the operator should check its access_key_id and secret.",
        )
    if status == 403:
        return ApiError(
            403,
            "s3_forbidden",
            f"Storage profile {profile!r} may not access {where} ({said}): its key lacks the permission for "
            "this bucket or prefix.",
        )
    if code in THROTTLE_ERRORS or status in (429, 503):
        retry_after = str(meta.get("HTTPHeaders", {}).get("retry-after", ""))
        return ApiError(
            503,
            "s3_throttled",
            f"The object store throttled storage profile {profile!r} ({said}) on all {attempts} attempts at "
            f"{where}; retry later.",
            headers={"Retry-After": retry_after if retry_after.isdigit() else "5"},
        )
    if status >= 500:
        return ApiError(
            502, "s3_error", f"The object store failed on {where} after {attempts} attempts ({said})."
        )
    return ApiError(400, "s3_error", f"The object store refused the request for {where} ({said}).")
