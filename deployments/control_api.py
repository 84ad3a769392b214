"""The control API and the web console, mounted on the ingress's FastAPI app.

    POST /v1/policy       change the run-time policy (admin token)   → scheduler.set_policy
    POST /v1/run-context  store the expected load (admin token)      → scheduler.set_run_context
    GET  /v1/policy       the current policy                          (open)
    GET  /v1/metrics      live JSON summary: tokens/s, TTFT/ITL p50/p95, KV per level, ... (open)
    GET  /v1/health       scheduler and replicas up?                  (open)
    GET  /  /console/*    the web console (static files)

Changes need `Authorization: Bearer <admin token>` (401 without, 403 wrong, 403 when no
token is configured at all); reads are open like `/metrics`, which Prometheus scrapes
unauthenticated and which says the same. Every change is validated before it is sent, and
the scheduler validates again, so a bad body changes nothing.

The routes are plain functions (not `Ingress` methods): they reach the replica's
`ControlAPI` through `request.app.state.control`, set by the ingress's constructor.
"""

import asyncio
import hmac
import logging
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from policies.run_context import RunContext
from policies.runtime import RuntimePolicy
from serving.api.auth import bearer_token
from serving.api.errors import BadRequest, Forbidden, ServeError, Unauthorized
from serving.api.protocol import read_json_body
from serving.config import InferosConfig
from serving.env import admin_token
from serving.metrics import FrontendMetrics, merge_expositions
from serving.telemetry import MetricsWindow, Snapshot, TelemetryWriter

logger = logging.getLogger(__name__)

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
CONSOLE_FILES = {
    "app.js": "text/javascript",
    "style.css": "text/css",
    "charts.js": "text/javascript",
}
POLICY_FIELDS = tuple(f for f in RuntimePolicy.model_fields if f != "version")
RUN_CONTEXT_FIELDS = tuple(f for f in RunContext.model_fields if f != "version")
WINDOW_S = 5.0
TELEMETRY_PERIOD_S = 1.0
PUSH_PERIOD_S = 1.0  # ingress metrics to the scheduler, only with several ingress replicas


class ConsoleFileNotFound(ServeError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ControlAPI:
    """Per ingress replica: the admin token, a metrics window and the telemetry loop."""

    def __init__(
        self,
        config: InferosConfig,
        model_name: str,
        replica_id: str,
        scheduler,  # ActorHandle of deployments.scheduler.SchedulerActor
        kv_store,  # ActorHandle of deployments.kv_store.KVStoreActor
        frontend: FrontendMetrics,
    ):
        self.model_name = model_name
        self.replica_id = replica_id
        self.max_model_len = config.model.max_model_len
        self.admin_token = config.server.admin_token or admin_token()
        self.scheduler, self.kv_store, self.frontend = scheduler, kv_store, frontend
        self.window = MetricsWindow(WINDOW_S)
        self._lock = asyncio.Lock()
        self._telemetry_task: asyncio.Task | None = None
        self._push_task: asyncio.Task | None = None
        if config.ingress.num_replicas > 1:  # the others' /metrics must show ours too
            self._push_task = asyncio.get_running_loop().create_task(self._push_loop())
        if config.server.telemetry_dir:
            self.telemetry = TelemetryWriter(config.server.telemetry_dir, model_name, replica_id)
            # the ingress constructor runs on the replica's event loop
            self._telemetry_task = asyncio.get_running_loop().create_task(self._telemetry_loop())
            logger.info("telemetry: one JSON line per second to %s", self.telemetry.path)

    # --- auth -------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.admin_token:
            raise Forbidden(
                "the control API is disabled: no admin token is configured "
                "(--admin-token, INFEROS_ADMIN_TOKEN or server.admin_token)"
            )
        sent = bearer_token(request.headers.get("authorization"))
        if sent is None:  # absent, or not in the Bearer form
            raise Unauthorized(
                "missing admin token (send 'Authorization: Bearer <admin token>')",
                code="missing_admin_token",
            )
        if not hmac.compare_digest(sent.encode("latin-1"), self.admin_token.encode()):
            raise Forbidden("wrong admin token", code="invalid_admin_token")

    # --- changes ----------------------------------------------------------------------------
    async def set_policy(self, body: dict) -> dict:
        _only_known(body, POLICY_FIELDS)
        current: RuntimePolicy = await self.scheduler.get_policy.remote()
        try:
            current.updated(body)  # the same validation the scheduler runs: errors come clean
        except ValidationError as e:
            raise _bad_body(e) from None
        try:
            policy = await self.scheduler.set_policy.remote(body)
        except Exception as e:  # a concurrent change made this one invalid
            raise BadRequest(f"policy change refused: {e}") from None
        logger.info("control API: policy %s", policy.model_dump())
        return policy.model_dump()

    async def set_run_context(self, body: dict) -> dict:
        _only_known(body, RUN_CONTEXT_FIELDS)
        try:
            RunContext.model_validate(body).check_fits(self.max_model_len)
        except ValidationError as e:
            raise _bad_body(e) from None
        except ValueError as e:
            raise BadRequest(str(e), param="expected_seq_len") from None
        ctx = await self.scheduler.set_run_context.remote(body)
        return ctx.model_dump()

    # --- reads ------------------------------------------------------------------------------
    async def exposition(self) -> str:
        """The merged page of every replica and actor: the ingress's /metrics."""
        texts = await self.scheduler.metrics_texts.remote(self.replica_id)
        texts.append(await self.kv_store.metrics_text.remote())
        texts.append(self.frontend.exposition())
        return merge_expositions(texts)

    async def summary(self) -> dict:
        text = await self.exposition()
        async with self._lock:
            self.window.add(Snapshot.parse(text, time.time()))
            summary = self.window.summary()
        policy, ctx = await asyncio.gather(
            self.scheduler.get_policy.remote(), self.scheduler.get_run_context.remote()
        )
        return {
            "object": "inferos.metrics",
            "model": self.model_name,
            "time": time.time(),
            **summary,
            "policy": policy.model_dump(),
            "run_context": ctx.model_dump() if ctx is not None else None,
        }

    async def health(self) -> tuple[int, dict]:
        r = await self.scheduler.readiness.remote()
        body = {
            "status": "ok" if r["ready"] else "starting",
            "replicas": r["replicas"],
            "pd_mode": r["pd_mode"],
            "in_flight": r["in_flight"],
        }
        return (200 if r["ready"] else 503), body

    async def push_metrics(self) -> None:
        await self.scheduler.push_metrics_text.remote(self.replica_id, self.frontend.exposition())

    async def _push_loop(self) -> None:
        while True:
            try:
                await self.push_metrics()
            except Exception:  # a restarting scheduler must not end the loop
                logger.warning("metrics push to the scheduler failed", exc_info=True)
            await asyncio.sleep(PUSH_PERIOD_S)

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(TELEMETRY_PERIOD_S)
            try:
                s = await self.summary()
                self.telemetry.write(s, s["policy"])
            except Exception:  # a slow or restarting scheduler must not end the loop
                logger.warning("telemetry sample failed", exc_info=True)


def _only_known(body: dict, fields: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(fields)}",
            param=unknown[0],
        )
    if not body:
        raise BadRequest(f"nothing to change: give one or more of {', '.join(fields)}")


def _bad_body(e: ValidationError) -> ServeError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param)


# --- routes --------------------------------------------------------------------------------
control_router = APIRouter()


def _api(request: Request) -> ControlAPI:
    return request.app.state.control


@control_router.post("/v1/policy")
async def post_policy(request: Request) -> JSONResponse:
    api = _api(request)
    api.authorize(request)
    return JSONResponse(await api.set_policy(await read_json_body(request)))


@control_router.get("/v1/policy")
async def get_policy(request: Request) -> JSONResponse:
    policy = await _api(request).scheduler.get_policy.remote()
    return JSONResponse(policy.model_dump())


@control_router.post("/v1/run-context")
async def post_run_context(request: Request) -> JSONResponse:
    api = _api(request)
    api.authorize(request)
    return JSONResponse(await api.set_run_context(await read_json_body(request)))


@control_router.get("/v1/metrics")
async def get_metrics(request: Request) -> JSONResponse:
    return JSONResponse(await _api(request).summary())


@control_router.get("/v1/health")
async def get_health(request: Request) -> JSONResponse:
    status, body = await _api(request).health()
    return JSONResponse(body, status_code=status)


@control_router.get("/", include_in_schema=False)
async def console_index() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html")


@control_router.get("/console/{name}", include_in_schema=False)
async def console_file(name: str) -> FileResponse:
    if name not in CONSOLE_FILES:  # a fixed list: no path from the URL reaches the disk
        raise ConsoleFileNotFound(f"no console file {name!r}")
    return FileResponse(CONSOLE_DIR / name, media_type=CONSOLE_FILES[name])
