"""OpenAI-style error bodies: `APIError`, the HTTP status each engine error maps to, and the app's handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptserve.serve.engine import EngineBusy, EngineError, TimedOut
from adaptserve.serve.schema import UnsupportedParameter

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error that becomes an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, code: str = "invalid_value", param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def overloaded(err: EngineBusy) -> APIError:
    """A full queue, or a server shutting down: not the client's fault, and worth retrying."""
    return APIError(503, f"{err}; retry shortly", "server_error", "overloaded", headers={"Retry-After": "1"})


def engine_failure(err: EngineError) -> APIError:
    if isinstance(err, EngineBusy):  # shutting down while the request waited or ran
        return overloaded(err)
    if isinstance(err, TimedOut):
        return APIError(504, str(err), "server_error", "timeout")
    return APIError(500, str(err), "server_error")


def add_error_handlers(app: FastAPI) -> None:
    """Every error a route, FastAPI's validation or an engine raises reaches the client as an OpenAI-style body."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, UnsupportedParameter):
            return invalid(str(cause), "unsupported_parameter", cause.param).response()
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
        message = (
            "request body is not valid JSON" if code == "invalid_json" else f"{loc or 'body'}: {first.get('msg', 'invalid')}"
        )
        return invalid(message, code, loc or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        code = "request_too_large" if err.status_code == 413 else None
        return APIError(err.status_code, str(err.detail), kind, code, headers=dict(err.headers or {})).response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, err: EngineError) -> JSONResponse:
        return engine_failure(err).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # a bug: still a JSON body, and logged
        log.error("unhandled %s", type(err).__name__, exc_info=err)
        return APIError(500, f"internal error: {type(err).__name__}", "server_error").response()
