"""Ingress deployment: the HTTP shell of the OpenAI-compatible API. It routes, admits and
answers; the rest is elsewhere:

- admission (429 at `max_pending_requests`) before anything is read or parsed;
- `serving.api.prepare`: validation, templating, tokenizing, limits (pure, off the loop);
- `deployments.request_flow`: route -> prefill -> decode -> clean-up, per choice;
- `deployments.rendering`: detokenizing, stop strings, logprobs, tool calls -> SSE or JSON.
Errors: `serving.api.http_errors` (OpenAI's shape for every status).
"""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from deployments.control_api import ControlAPI, control_router
from deployments.decode_mux import DecodeMux
from deployments.direct_http import DirectHTTP
from deployments.kv_store import kv_store_actor
from deployments.loopback import keep_replica_grpc_on_loopback
from deployments.rendering import Renderer
from deployments.request_flow import RequestFlow
from deployments.scheduler import scheduler_actor
from deployments.sessions import conversation_start, session_id
from deployments.subscribers import subscriber_name
from serving.api.auth import ApiKeyAuth, Auth
from serving.api.errors import (
    BadRequest,
    TooManyRequests,
)
from serving.api.http_errors import install_error_handlers
from serving.api.limits import Limits, RequestLimits
from serving.api.prepare import (
    ModelInfo,
    Prepared,
    PrepareOptions,
    check_model,
    prepare,
)
from serving.api.protocol import parse_json_body, read_json_body
from serving.api.tokenize import detokenize, tokenize
from serving.config import InferosConfig
from serving.logging_setup import configure_logging
from serving.metrics import FrontendMetrics
from serving.models.hf_folder import resolve_model_path, served_model_name
from serving.structured.engine_grammar import LazyEngineGrammar, build_engine_grammar
from serving.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)
T = TypeVar("T")
HEALTH_TIMEOUT_S = 2.0
try:
    VERSION = version("inferos-serve")  # GET /version, as vLLM's
except PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
app = FastAPI(title="Infer-OS Serve")
app.include_router(control_router)  # control API (/v1/policy, ...) and the console at /
install_error_handlers(app)  # OpenAI-shaped JSON for every error, counted per status
app.add_middleware(RequestLimits)  # 431 / 413 before a request reaches a route
app.add_middleware(ApiKeyAuth)  # outermost: no key, nothing else runs


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, the client going away included,
    so the request is aborted and counted out now — not whenever the garbage collector
    happens to find an abandoned generator (which left decode busy for 30 s and more)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        prefill: DeploymentHandle | None,
        decode: DeploymentHandle,
        config: dict,
        direct_http: bool = False,
    ):
        configure_logging()
        keep_replica_grpc_on_loopback()
        self.config = InferosConfig.model_validate(config)
        path = resolve_model_path(self.config.model.path)
        self.model_name = self.config.model.served_model_name or served_model_name(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_model_len = self.config.model.max_model_len
        self.model_info = ModelInfo.of(self.model_name, self.max_model_len, self.tokenizer, path)
        self.prepare_options = self._prepare_options()
        self.scheduler = scheduler_actor(config)
        self.kv_store = kv_store_actor(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # decode streams go to this name; decode aborts them once it names no live actor
        self.subscriber_id = subscriber_name()
        self.mux = DecodeMux(decode, self.subscriber_id, self._replica_lost)
        self.metrics = FrontendMetrics(self.model_name, self.replica_id)
        self.flow = RequestFlow(
            self.config, self.scheduler, self.kv_store, prefill, decode, self.mux,
            self.subscriber_id, self.metrics, on_done=self._done,
        )  # fmt: skip
        self.renderer = Renderer(self.tokenizer, self.metrics)
        app.state.metrics = self.metrics  # the error handlers count every error answered
        app.state.control = ControlAPI(
            self.config, self.model_name, self.replica_id, self.scheduler, self.kv_store,
            self.metrics,
        )  # fmt: skip
        app.state.auth = Auth.of(
            self.config.api_keys, app.state.control.admin_token, self.config.server.public_paths
        )
        app.state.request_limits = Limits(
            self.config.max_body_bytes, self.config.server.max_header_bytes
        )
        # JSON parsing, templating and tokenizing run here, off the event loop, so a large
        # prompt holds up no stream and no /health; one thread, as a Hugging Face fast
        # tokenizer is not safe to call from several at once ("Already borrowed")
        self.preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self.in_flight = 0
        self.created = int(time.time())
        # launch.run_app's own cluster: this replica answers server.host:port itself
        self.direct_http = (
            DirectHTTP(self.config.server.host, self.config.server.port) if direct_http else None
        )

    def _prepare_options(self) -> PrepareOptions:
        """Validation's server settings; a structured output spec is compiled here too
        (the grammar engine built on first use, a cache after), so a schema the engine
        refuses is the client's 400, not a replica's failure."""
        structured, tools = self.config.structured_outputs, self.config.tool_calling
        grammar = LazyEngineGrammar(
            lambda: build_engine_grammar(
                self.tokenizer,
                self.model_info.vocab_size,
                [self.tokenizer.eos_token_id],
                structured.backend,
                structured.any_whitespace,
            )
        )

        def compile_check(spec: StructuredSpec) -> object:
            return grammar.get().cache.get(spec)

        return PrepareOptions(compile_check, tools.tool_call_parser, tools.enable_auto_tool_choice)

    async def check_health(self) -> None:
        if self.direct_http is not None:  # Serve's first check: the replica is ready
            self.direct_http.serve(self.app)  # `self.app`: the ASGI app Serve calls

    async def __del__(self) -> None:  # Serve calls it on replica shutdown
        direct_http = getattr(self, "direct_http", None)  # None too if __init__ failed
        if direct_http is not None:
            await direct_http.stop()

    async def _replica_lost(self, replica_id: str) -> None:
        await self.scheduler.forget.remote(replica_id)

    # --- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        """200 when requests can be served: the scheduler and the KV store answer, and the
        replicas a request needs are up; else 503 saying what is missing."""
        try:
            readiness, _ = await asyncio.wait_for(
                asyncio.gather(self.scheduler.readiness.remote(), self.kv_store.ping.remote()),
                HEALTH_TIMEOUT_S,
            )
        except (RayError, TimeoutError) as e:  # restarting (actors.get_or_create) or gone
            reason = f"scheduler or kv_store not answering: {type(e).__name__}"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        if not readiness["ready"]:
            body = {"status": "starting", "replicas": readiness["replicas"]}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    # `:path`: a model id may hold slashes (`org/name`; the openai client's %2F arrives decoded)
    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict:
        check_model(model_id, self.model_info)  # 404 model_not_found
        return self._model_card()

    def _model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "inferos",
            "root": self.model_name,
            "max_model_len": self.max_model_len,
        }

    # vLLM's extra endpoints, outside /v1 as vLLM has them (but behind the API key)
    @app.post("/tokenize")
    async def post_tokenize(self, request: Request) -> dict:
        body = await read_json_body(request)
        return await self._off_loop(tokenize, body, self.tokenizer, self.model_info)

    @app.post("/detokenize")
    async def post_detokenize(self, request: Request) -> dict:
        body = await read_json_body(request)
        return await self._off_loop(detokenize, body, self.tokenizer, self.model_info)

    @app.get("/version")
    async def get_version(self, request: Request) -> dict:
        return {"version": VERSION}

    @app.get("/metrics")
    async def prometheus(self) -> PlainTextResponse:
        # every replica's and actor's metrics, other ingress replicas' included
        text = await app.state.control.exposition()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # --- generation ----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        # admission first: a server at its limit reads, parses and tokenizes nothing more
        if self.in_flight >= self.config.scheduling.max_pending_requests:
            raise TooManyRequests(
                f"server is at its limit of {self.config.scheduling.max_pending_requests} "
                "requests in flight; retry shortly"
            )
        # Counted out in `RequestFlow._generate`'s finally, which runs however the request
        # ends (the streaming response closes its generator: `ClosingStreamingResponse`),
        # or below when the request is refused before the flow starts.
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            raw = await request.body()  # at most server.max_body_bytes (RequestLimits)
            prepared = await self._off_loop(
                self._prepare, raw, request.headers.get("content-type"), chat
            )
            prepared.session_id = session_id(request.headers, prepared)
        except BaseException:
            self._done()
            raise
        self._count_in(prepared.n - 1)  # every choice is counted out by its flow
        runs = await self.flow.start(prepared, started)
        if prepared.stream:
            return ClosingStreamingResponse(
                self.renderer.sse(prepared, runs, started), media_type="text/event-stream"
            )
        return JSONResponse(await self.renderer.collect(prepared, runs, started))

    def _count_in(self, n: int) -> None:
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)

    def _done(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    def _prepare(self, raw: bytes, content_type: str | None, chat: bool) -> Prepared:
        prepared = prepare(
            parse_json_body(raw, content_type),
            chat,
            self.tokenizer,
            self.model_info,
            self.prepare_options,
        )
        if prepared.params.structured is not None and self._prefill_samples_in_vllm():
            raise BadRequest(
                "structured output (and tool_choice required or a named function) is not "
                "available with prefill.backend vllm; serve with the torch prefill backend "
                "or scheduling.pd_mode colocated",
                param="response_format" if chat else "structured_outputs",
            )
        prepared.conversation_start = conversation_start(prepared.request, prepared.prompt_ids)
        return prepared

    def _prefill_samples_in_vllm(self) -> bool:
        c = self.config
        return (
            c.prefill.backend == "vllm"
            and c.has_prefill_replicas
            and c.scheduling.pd_mode != "colocated"
        )

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.preparer, fn, *args)


IngressDeployment = serve.deployment(Ingress, name="ingress")
