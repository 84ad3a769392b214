"""API keys: one check, in front of every route.

`ApiKeyAuth` (ASGI middleware) reads `app.state.auth` (an `Auth`): with keys configured,
every request outside the public paths needs `Authorization: Bearer <key>` for one of the
keys — or the admin token, which may do everything a key may. Keys are compared in constant
time, against every key, so neither a key's prefix nor which key matched shows in the time
the answer takes. No keys configured, everything is open (the local default, as vLLM's).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.errors import Unauthorized
from serving.api.http_errors import error_response


@dataclass(frozen=True, slots=True)
class Auth:
    keys: tuple[bytes, ...]
    admin_token: bytes | None = None
    public_paths: tuple[str, ...] = ()  # serving.config.DEFAULT_PUBLIC_PATHS by default

    @classmethod
    def of(
        cls, keys: Iterable[str], admin_token: str | None, public_paths: Iterable[str]
    ) -> Auth:
        return cls(
            tuple(k.encode() for k in keys if k),
            admin_token.encode() if admin_token else None,
            tuple(public_paths),
        )

    def is_public(self, path: str) -> bool:
        """Exact paths, and whole subtrees for entries that end in '/' (other than '/')."""
        return any(
            path == p or (p != "/" and p.endswith("/") and path.startswith(p))
            for p in self.public_paths
        )

    def accepts(self, sent: bytes) -> bool:
        ok = False
        for key in self.keys + ((self.admin_token,) if self.admin_token else ()):
            ok |= hmac.compare_digest(sent, key)  # no early exit: the time says nothing
        return ok


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for any other form."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """ASGI middleware enforcing `app.state.auth` on every HTTP request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        auth: Auth | None = getattr(getattr(app, "state", None), "auth", None)
        if scope["type"] != "http" or auth is None or not auth.keys:
            await self.app(scope, receive, send)
            return
        if auth.is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        token = bearer_token(header)
        if token is None or not auth.accepts(token.encode("latin-1")):
            err = Unauthorized(
                "missing or wrong API key (send 'Authorization: Bearer <key>')"
                if header
                else "this server needs an API key (send 'Authorization: Bearer <key>')"
            )
            await error_response(app, err)(scope, receive, send)
            return
        await self.app(scope, receive, send)
