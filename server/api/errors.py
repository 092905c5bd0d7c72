"""Errors as HTTP replies: ApiError (server/errors.py), request validation, unknown routes, the model
registry's errors, and bugs, each rendered as {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.base import ModelLoading, ModelUnavailable, UnknownModel
from server.errors import ApiError, error_body
from server.ops.request_context import REQUEST_ID_HEADER, current

log = logging.getLogger("labelserve")


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", _validation_message(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log it whole, tell the client nothing internal.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # This runs outside the request middleware, which left the request's context set for it.
        context = current()
        return JSONResponse(
            error_body("internal_error", "The server failed on this request; it has been logged."),
            status_code=500,
            headers={REQUEST_ID_HEADER: context.request_id} if context is not None else None,
        )


def install_model_errors(app: FastAPI) -> None:
    @app.exception_handler(UnknownModel)
    async def _unknown(_: Request, exc: UnknownModel) -> JSONResponse:
        return JSONResponse(error_body("unknown_model", str(exc)), status_code=404)

    @app.exception_handler(ModelUnavailable)
    async def _unavailable(_: Request, exc: ModelUnavailable) -> JSONResponse:
        message = f"{exc} Fix: {exc.fix}" if exc.fix else str(exc)
        return JSONResponse(error_body("model_unavailable", message), status_code=503)

    @app.exception_handler(ModelLoading)
    async def _loading(_: Request, exc: ModelLoading) -> JSONResponse:
        return JSONResponse(
            error_body("model_loading", str(exc)), status_code=503, headers={"Retry-After": "5"}
        )
