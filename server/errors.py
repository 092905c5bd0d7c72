"""One error type for everything a client can get wrong, rendered as {"error": {"code", "message"}} (by
server/api/errors.py: this module imports no FastAPI, so every layer may raise it)."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def busy(what: str, retry_after_s: float) -> ApiError:
    return ApiError(
        503,
        "server_busy",
        f"labelserve is at capacity ({what}); retry after {retry_after_s:g} s.",
        headers={"Retry-After": f"{max(round(retry_after_s), 1)}"},
    )


def shutting_down() -> ApiError:
    """What work that cannot finish before this process stops is told: another replica, or this one once
    restarted, will take it."""
    return ApiError(
        503,
        "shutting_down",
        "labelserve is shutting down and starts no new encodes; retry in a few seconds (another replica, or "
        "this one after its restart, will serve it).",
        headers={"Retry-After": "2"},
    )
