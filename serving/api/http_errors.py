"""Every error the HTTP API answers, in OpenAI's shape, counted once.

`install_error_handlers(app)` maps
- a `ServeError` → its status and body (`Retry-After` on a 429);
- Starlette's own errors (an unknown route → 404, a wrong method → 405 with `Allow`) and
  FastAPI's request validation (→ 400) → the same shape;
- any other exception → a JSON 500 that says nothing of the internals: the traceback goes to
  the log under an error id that the message gives.

Each error answered counts once in `inferos:request_errors_total{code}` through
`app.state.metrics` (a `FrontendMetrics`) when that is set. Errors inside a stream that has
already begun are SSE events, counted where they are sent.
"""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.errors import (
    BadRequest,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    ServeError,
    TooManyRequests,
)

logger = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """ASCII-escaped JSON: a body quoting a client's text always encodes."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    app: object, err: ServeError, headers: dict[str, str] | None = None
) -> ErrorResponse:
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.error(err.http_status)
    if isinstance(err, TooManyRequests):
        headers = {**(headers or {}), "Retry-After": str(err.retry_after_s)}
    return ErrorResponse(err.body(), status_code=err.http_status, headers=headers)


def internal_error() -> InternalServerError:
    error_id = uuid.uuid4().hex[:12]
    logger.exception("unexpected error (error id %s)", error_id)  # call from an except block
    return InternalServerError(
        f"The server had an error while processing your request (error id {error_id}); "
        "it has been logged. Retry, or report the error id if it persists."
    )


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return error_response(request.app, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    where = f"{request.method} {request.url.path[:200]}"
    err: ServeError
    if exc.status_code == 404:
        err = NotFound(f"Invalid URL ({where}): no such route")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"Method not allowed ({where}); allowed: {_allowed(exc)}")
    else:
        err = ServeError(str(exc.detail))
        err.http_status = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else err.error_type
    return error_response(request.app, err, headers=exc.headers)


def _allowed(exc: StarletteHTTPException) -> str:
    return (exc.headers or {}).get("Allow", "") or "none"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = str(first.get("msg", "invalid request"))
    return error_response(
        request.app, BadRequest(f"{param}: {message}" if param else message, param=param)
    )


class InternalErrors:
    """ASGI middleware: an exception no handler took becomes a JSON 500 (Starlette's own
    fallback answers plain text). Once a response has begun it can only be cut short."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            err = internal_error()
            if started:
                raise
            await error_response(scope.get("app"), err)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(InternalErrors)
