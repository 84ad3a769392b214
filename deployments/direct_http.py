"""The ingress replica's own HTTP server: `server.host:port` answered inside the replica.

On a cluster `launch.run_app` started itself, Serve's proxy moves to a free port and each
ingress replica serves the configured port with uvicorn, on the replica's event loop, from
the same FastAPI app Serve would call. A streamed chunk then goes replica → client instead
of replica → proxy → client: one actor hop less per chunk (~15% more output tokens/s at
32 streams on 2 cores). Ingress replicas on one node share the port (SO_REUSEPORT; the
kernel spreads the connections). `server.direct_http: false`, `RAY_ADDRESS` and
`serve run`/KubeRay keep Serve's proxy on the port.

Lifecycle, all on the replica's event loop: `DirectHTTP(host, port)` binds in the
constructor (a taken port fails the replica at once), `serve(app)` starts listening from
the replica's health check (Serve calls the first one once the replica is initialized,
so no request meets a half-built replica) and raises there if the server has died, and
`stop()` runs from the replica's `__del__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
from pathlib import Path

import uvicorn
from ray.serve.config import HTTPOptions
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


class PortInUse(OSError):
    """`server.host:port` is taken by a process that does not share it with us."""


def bind_socket(host: str, port: int, share: bool) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening). `share`: SO_REUSEPORT, so other
    ingress replicas on this node can bind the same port; without it (the launcher's check)
    the bind fails while anyone listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT of a restart
    if share:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(
                e.errno,
                f"{host}:{port} is in use (another `inferos serve`?): stop it or pick another "
                "port (--port, server.port)",
            ) from e
        raise
    return sock


# Ray's workers listen on ports 10002-19999 unless told otherwise (--min/max-worker-port).
RAY_WORKER_PORTS_END = 20000
LINUX_EPHEMERAL_PORTS = (32768, 60999)


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to whoever binds port 0 (inclusive)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return LINUX_EPHEMERAL_PORTS


def free_port(host: str, attempts: int = 100) -> int:
    """A port free on `host` now that stays free until someone asks for it by number (Serve's
    proxy here; the test apps' ports): one outside the kernel's ephemeral range and Ray's
    worker ports. A port the kernel picks for a bind to port 0 lies in the ephemeral range,
    where any of the dozens of sockets a starting Ray cluster binds to port 0 may be handed
    the same number before our server binds it (seen in CI: `inferos serve --port P` failed
    with P taken by its own new Ray cluster)."""
    low, high = ephemeral_port_range()
    ranges = [r for r in (range(RAY_WORKER_PORTS_END, low), range(high + 1, 65536)) if r]
    for _ in range(attempts if ranges else 0):
        span = random.choice(ranges)
        port = random.randrange(span.start, span.stop)
        try:
            with bind_socket(host, port, share=False):
                return port
        except PortInUse:
            continue
    with bind_socket(host, 0, share=False) as sock:  # nothing else free: the kernel's pick
        return sock.getsockname()[1]


def cancel_on_disconnect(app: ASGIApp) -> ASGIApp:
    """Cancels a request whose client leaves before the response starts, as Serve's proxy
    does: a non-streaming completion would otherwise decode to the end for nobody. Once the
    response has started, a streaming response sees the disconnect itself and closes its
    generator (`ClosingStreamingResponse`), which aborts the request on decode."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        messages: asyncio.Queue[Message] = asyncio.Queue()
        started = False

        async def pump() -> None:  # the only reader of uvicorn's receive
            while True:
                message = await receive()
                messages.put_nowait(message)
                if message["type"] == "http.disconnect":
                    return

        async def app_receive() -> Message:
            message = await messages.get()
            if message["type"] == "http.disconnect":
                messages.put_nowait(message)  # stays disconnected for every later read
            return message

        async def app_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        handler = asyncio.ensure_future(app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(pump())
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not started:  # the client left before any answer
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                return
            await handler
        finally:
            watcher.cancel()
            if not handler.done():  # uvicorn cancelled us (forced shutdown)
                handler.cancel()

    return wrapped


class DirectHTTP:
    """uvicorn serving one ASGI app on a shared host:port, inside a Serve replica."""

    def __init__(self, host: str, port: int, shutdown_timeout_s: float = 1.0) -> None:
        self.host, self.port = host, port
        self.shutdown_timeout_s = shutdown_timeout_s
        self._sock = bind_socket(host, port, share=True)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    def serve(self, app: ASGIApp) -> None:
        """Start listening on the first call (from the replica's event loop); on later calls,
        raise if the server has stopped, so Serve's health check replaces the replica."""
        if self._task is None:
            config = uvicorn.Config(
                cancel_on_disconnect(app),
                lifespan="off",  # Serve ran the app's lifespan already
                access_log=False,
                log_config=None,  # leave the replica's logging as Ray set it up
                ws="none",
                timeout_keep_alive=HTTPOptions().keep_alive_timeout_s,  # as Serve's proxy
                timeout_graceful_shutdown=self.shutdown_timeout_s,
            )
            self._server = uvicorn.Server(config)
            # signal handlers are Ray's in a replica (uvicorn takes them on the main thread)
            self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
            self._task = asyncio.get_running_loop().create_task(
                self._server.serve(sockets=[self._sock])
            )
            logger.info("ingress serving http://%s:%d directly", self.host, self.port)
            return
        if self._task.done() and not self._server.should_exit:
            error = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError(
                f"the ingress's HTTP server on {self.host}:{self.port} stopped"
            ) from error

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests `shutdown_timeout_s`, then close."""
        if self._task is None:
            self._sock.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, self.shutdown_timeout_s + 1.0)
        except Exception:  # a timeout or the server's own failure: it is going away anyway
            logger.warning("ingress HTTP server on port %d did not stop cleanly", self.port)
        finally:
            self._sock.close()
