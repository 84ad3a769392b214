"""Size limits that protect the ingress from one client's oversized request.

- `RequestLimits` (ASGI middleware, every route): headers beyond `max_header_bytes` are a
  431, a body beyond `max_body_bytes` a 413 — refused from `Content-Length` before a byte
  of the body is read, and counted while it is read when the client sends none (chunked).
  The limits are `app.state.request_limits`; none set, nothing is checked.
- `bounded_id`: a client-chosen identifier (`X-Session-Id`, `user`) kept to a fixed length,
  so the maps keyed by it (the scheduler's session affinities) stay bounded in bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.errors import ServeError
from serving.api.http_errors import error_response

MAX_ID_CHARS = 128  # longer ids are replaced by a digest of the same length class


class PayloadTooLarge(ServeError):
    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(ServeError):
    http_status = 431
    error_type = "invalid_request_error"
    code = "request_header_fields_too_large"


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int
    max_header_bytes: int  # all header names and values together


def bounded_id(value: str, max_chars: int = MAX_ID_CHARS) -> str:
    """`value` itself when short; else a digest of it (same value → same id, so affinity
    still works for a client that sends a long id every time)."""
    if len(value) <= max_chars:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is larger than this server's limit of {limit} bytes "
        "(server.max_body_bytes)"
    )


class RequestLimits:
    """ASGI middleware enforcing `app.state.request_limits` (a `Limits`) on every request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        limits: Limits | None = getattr(getattr(app, "state", None), "request_limits", None)
        if scope["type"] != "http" or limits is None:
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        header_bytes = sum(len(k) + len(v) for k, v in headers)
        if header_bytes > limits.max_header_bytes:
            err = HeadersTooLarge(
                f"the request headers take {header_bytes} bytes; this server's limit is "
                f"{limits.max_header_bytes}"
            )
            await error_response(app, err)(scope, receive, send)
            return
        declared = _content_length(Headers(raw=headers).get("content-length"))
        if declared is not None and declared > limits.max_body_bytes:
            await error_response(app, _too_large(limits.max_body_bytes))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:  # raised into whoever reads the body
                    raise _too_large(limits.max_body_bytes)
            return message

        await self.app(scope, counting_receive, send)


def _content_length(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
