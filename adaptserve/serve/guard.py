"""What a request must pass before any route sees it: an API key on the API paths, and a cap on its body size.

Pure ASGI rather than FastAPI dependencies: it covers every route by path prefix, including the ones added
later and the ones that do not exist (a 401 never tells an anonymous client which routes are real), and it
refuses an oversized body from its Content-Length before reading a byte of it.
"""

from __future__ import annotations

import hmac
import os

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adaptserve.serve.schema import ErrorDetail, ErrorResponse

PROTECTED = ("/v1", "/admin", "/tokenize", "/detokenize", "/tokenizer_info")  # /health, /metrics, /docs, UI: open
KEYS_ENV = "ADAPTSERVE_API_KEYS"


def env_keys() -> list[str]:
    """Keys from $ADAPTSERVE_API_KEYS (comma-separated), so they need not appear on a command line."""
    return [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]


def all_keys(configured: list[str]) -> list[str]:
    """The keys a request may present: those of --api-key, then those of $ADAPTSERVE_API_KEYS."""
    return [*configured, *env_keys()]


def protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED)


def refusal(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type="invalid_request_error", code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def too_large(limit: int) -> str:
    return f"request body is larger than the server's limit of {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without a Content-Length grows past the cap; FastAPI re-raises
    HTTPExceptions from body reading as they are, so the app's handler answers 413 as JSON."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit))


class Guard:
    def __init__(self, app: ASGIApp, keys: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.max_body_bytes = max_body_bytes

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # Compared with every key, in constant time each: neither the match nor its position leaks through timing.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return scheme.lower() == b"bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.keys and protected(scope["path"]) and not self.authorized(headers):
            message = "missing or invalid API key: send it as 'Authorization: Bearer <key>'"
            await refusal(401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await refusal(413, too_large(self.max_body_bytes), "request_too_large")(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:  # a chunked body declares no length: count what arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, counted, send)
