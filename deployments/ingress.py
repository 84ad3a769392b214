"""Ingress deployment: the OpenAI-compatible HTTP API in front of prefill and decode.

Per request: validate → tokenize (chat template) → admission → scheduler.route →
prefill (first token, KV into the store) → decode (streamed back through `DecodeMux`) →
detokenize, stop strings → SSE or one JSON body.
"""

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from deployments.actors import kv_store_actor, scheduler_actor
from deployments.control_api import ControlAPI, control_router
from deployments.decode_mux import DecodeMux
from deployments.sessions import conversation_start, session_id
from serving.api.detokenizer import IncrementalDetokenizer
from serving.api.errors import (
    BadRequest,
    ContextLengthExceeded,
    RequestTimeout,
    ServeError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnknownModel,
)
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, read_json_body
from serving.api.responses import SSE_DONE, ResponseBuilder, Usage, sse_error
from serving.config import InferosConfig
from serving.engine.sampling_params import SamplingParams
from serving.logging_setup import configure_logging
from serving.messages import DecodeRequest, PrefillRequest, RoutePlan, TokenDelta
from serving.metrics import FrontendMetrics
from serving.models.hf_folder import resolve_model_path, served_model_name

logger = logging.getLogger(__name__)
app = FastAPI(title="Infer-OS Serve")
app.include_router(control_router)  # control API (/v1/policy, ...) and the console at /


@app.exception_handler(ServeError)
async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyRequests) else None
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)


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


@dataclass(slots=True)
class Prepared:
    """A validated request, ready to run."""

    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    builder: ResponseBuilder
    stream: bool
    include_usage: bool
    user: str | None = None
    conversation_start: str = ""  # what every turn of one conversation starts with
    session_id: str | None = None  # routing affinity across a conversation's turns


@serve.ingress(app)
class Ingress:
    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle, config: dict):
        configure_logging()
        self.config = InferosConfig.model_validate(config)
        path = resolve_model_path(self.config.model.path)
        self.model_name = self.config.model.served_model_name or served_model_name(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_model_len = self.config.model.max_model_len
        self.prefill = prefill
        self.decode = decode
        self.scheduler = scheduler_actor(config)
        self.kv_store = kv_store_actor(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.mux = DecodeMux(decode, self.replica_id, self._replica_lost)
        self.metrics = FrontendMetrics(self.model_name, self.replica_id)
        app.state.control = ControlAPI(
            self.config, self.model_name, self.replica_id, self.scheduler, self.kv_store,
            self.metrics,
        )  # fmt: skip
        self.in_flight = 0
        self.created = int(time.time())
        self._cleanups: set[asyncio.Task] = set()

    async def _replica_lost(self, replica_id: str) -> None:
        await self.scheduler.forget.remote(replica_id)

    # --- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        snap = await self.scheduler.snapshot.remote()
        if not snap["decode"] or not snap["prefill"]:
            return JSONResponse({"status": "starting", "replicas": snap}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "inferos",
            "root": self.model_name,
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}

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
        try:
            self._authorize(request)
            prepared = self._prepare(await read_json_body(request), chat)
            prepared.session_id = session_id(request.headers, prepared)
            if self.in_flight >= self.config.scheduling.max_pending_requests:
                raise TooManyRequests(
                    f"server is at its limit of {self.config.scheduling.max_pending_requests} "
                    "requests in flight; retry shortly"
                )
        except ServeError as e:
            self.metrics.error(e.http_status)
            raise
        # Counted out in `_generate`'s finally, which runs however the request ends: the
        # streaming response closes its generator (`ClosingStreamingResponse`), and one
        # never started is closed by asyncio when it is collected.
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        events = self._generate(prepared, started)
        try:
            first = await anext(events)  # routing/prefill errors surface as HTTP errors here
        except ServeError as e:
            self.metrics.error(e.http_status)
            raise
        if prepared.stream:
            return ClosingStreamingResponse(
                self._sse(prepared, first, events, started), media_type="text/event-stream"
            )
        try:
            return JSONResponse(await self._collect(prepared, first, events, started))
        except ServeError as e:
            self.metrics.error(e.http_status)
            raise

    def _done(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    def _authorize(self, request: Request) -> None:
        key = self.config.server.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")

    def _prepare(self, body: dict, chat: bool) -> Prepared:
        model_cls = ChatCompletionRequest if chat else CompletionRequest
        try:
            req = model_cls.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise BadRequest(
                f"{param}: {err['msg']}" if param else err["msg"], param=param
            ) from None
        if req.model != self.model_name:
            raise UnknownModel(
                f"The model `{req.model}` does not exist; this server serves `{self.model_name}`.",
                param="model",
            )
        req.check_supported()
        if chat:
            prompt_ids = self._chat_prompt(req)  # type: ignore[arg-type]
            requested = req.requested_max_tokens()  # type: ignore[union-attr]
        else:
            prompt = req.single_prompt()  # type: ignore[union-attr]
            prompt_ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
            requested = req.max_tokens
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        if any(not 0 <= t < len(self.tokenizer) for t in prompt_ids):
            raise BadRequest("prompt token ids out of the vocabulary", param="prompt")
        max_tokens = requested if requested is not None else self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len or max_tokens < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {len(prompt_ids) + max(max_tokens, 0)} tokens "
                f"({len(prompt_ids)} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion.",
                param="max_tokens" if requested else "messages" if chat else "prompt",
            )
        # The response id is the request id everywhere (logs, kv_store keys), as in vLLM.
        req_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return Prepared(
            req_id=req_id,
            prompt_ids=list(prompt_ids),
            params=req.sampling_params(max_tokens),
            builder=ResponseBuilder(req_id, self.model_name, chat),
            stream=req.stream,
            include_usage=req.include_usage,
            user=req.user,
            conversation_start=conversation_start(req, prompt_ids),
        )

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=False
            )
        except Exception as e:
            raise BadRequest(f"chat template failed: {e}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def _generate(self, p: Prepared, started: float) -> AsyncIterator[TokenDelta]:
        """Routes, prefills and decodes one request; yields its token deltas."""
        plan: RoutePlan | None = None
        finished = False
        kv_key = None
        failed = False  # a server-side failure (client errors are caught before routing)
        try:
            plan = await self.scheduler.route.remote(
                p.req_id, len(p.prompt_ids), p.session_id
            )
            if plan is None:
                raise Unavailable("no decode replica is ready yet; retry shortly")
            deadline = started + (self.config.scheduling.request_timeout_s or float("inf"))
            if plan.prefill_replica is not None:
                first, kv_key = await self._within(
                    self._prefill(p, plan.prefill_replica, plan.prefill_threads), deadline
                )
                if first.finished:
                    finished = True
                    yield first
                    return
                queue = await self._start_decode(p, plan, first.token_ids[0], kv_key)
            else:  # colocated: the decode replica prefills, its first delta is the TTFT
                queue = await self._start_decode(p, plan, None, None)
                first = await self._within(queue.get(), deadline)
                if first.error is not None:
                    raise Unavailable(f"decode failed: {first.error}")
            self.metrics.ttft.observe(time.perf_counter() - started)
            finished = first.finished
            yield first
            while not finished:
                delta = await self._within(queue.get(), deadline)
                finished = delta.finished
                failed = failed or delta.error is not None
                yield delta
        except RequestTimeout:
            raise  # load, not a malfunction: not counted against the error rate
        except (Unavailable, RayError):
            failed = True
            raise
        finally:
            self._done()
            self.mux.close(p.req_id)
            if plan is not None:
                self._clean_up(p.req_id, plan, kv_key, aborted=not finished, failed=failed)

    async def _within(self, awaitable, deadline: float):
        """`await awaitable`, or a clean 503 `request_timeout` once `deadline` has passed."""
        remaining = deadline - time.perf_counter()
        try:
            return await asyncio.wait_for(awaitable, max(remaining, 0.001))
        except TimeoutError:
            raise RequestTimeout(
                f"request timed out after {self.config.scheduling.request_timeout_s:g} s "
                "(scheduling.request_timeout_s); it was aborted"
            ) from None

    def _clean_up(
        self, req_id: str, plan: RoutePlan, kv_key: str | None, aborted: bool, failed: bool
    ) -> None:
        """Tell the scheduler (and, for a request that ended early, decode and the store).

        The calls go out from a task outside the request's context: made from the request
        itself while a client disconnect cancels it, Serve cancels them too (recursive
        cancellation) and the decode replica would go on generating for nobody."""
        if aborted:  # client went away, a stop string matched, or an error
            logger.info("request %s ended early: aborting it on decode", req_id)

        async def send() -> None:
            self.scheduler.finished.remote(req_id, failed)
            if aborted:
                await self.decode.abort.remote(req_id, replica_id=plan.decode_replica)
                if kv_key is not None:  # nobody will resume it: free the blocks now
                    await self.kv_store.drop.remote(kv_key)

        task = asyncio.get_running_loop().create_task(send(), context=contextvars.Context())
        self._cleanups.add(task)  # keep a reference until done
        task.add_done_callback(self._cleanups.discard)

    async def _prefill(
        self, p: Prepared, replica_id: str, num_threads: int | None
    ) -> tuple[TokenDelta, str | None]:
        result = await self.prefill.prefill.remote(
            PrefillRequest(p.req_id, p.prompt_ids, p.params, num_threads), replica_id=replica_id
        )
        self.scheduler.prefill_done.remote(p.req_id)
        if result.error is not None:
            raise Unavailable(f"prefill failed: {result.error}")
        first = TokenDelta(p.req_id, [result.first_token_id], result.finished, result.finish_reason)
        return first, result.kv_key

    async def _start_decode(
        self, p: Prepared, plan: RoutePlan, first_token: int | None, kv_key: str | None
    ) -> asyncio.Queue[TokenDelta]:
        queue = await self.mux.open(p.req_id, plan.decode_replica)
        request = DecodeRequest(
            p.req_id, p.prompt_ids, first_token, p.params, kv_key, self.replica_id
        )
        error = await self.decode.submit.remote(request, replica_id=plan.decode_replica)
        if error is not None:
            raise Unavailable(f"decode could not start: {error}")
        return queue

    async def _run(self, p: Prepared, first: TokenDelta, events: AsyncIterator[TokenDelta]):
        """Shared by streaming and non-streaming: yields (text, finish_reason, usage)."""
        detok = IncrementalDetokenizer(self.tokenizer, p.prompt_ids, p.params.stop)
        usage = Usage(prompt_tokens=len(p.prompt_ids))
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        last = time.perf_counter()
        delta: TokenDelta | None = first
        while delta is not None:
            if delta.error is not None:
                raise Unavailable(delta.error)
            usage.completion_tokens += len(delta.token_ids)
            self.metrics.generation_tokens.inc(len(delta.token_ids))
            now = time.perf_counter()
            if delta is not first and delta.token_ids:
                gap = (now - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self.metrics.itl.observe(gap)
            last = now
            text = detok.add(delta.token_ids)
            if detok.stopped:
                yield text, "stop", usage
                return
            if delta.finished:
                yield text + detok.flush(), delta.finish_reason, usage
                return
            yield text, None, usage
            delta = await anext(events, None)
        raise Unavailable("the decode stream ended early")

    async def _collect(self, p: Prepared, first: TokenDelta, events, started: float) -> dict:
        parts: list[str] = []
        reason, usage = None, Usage(len(p.prompt_ids))
        try:
            async for text, step_reason, step_usage in self._run(p, first, events):
                parts.append(text)
                reason, usage = step_reason, step_usage
        finally:
            await events.aclose()
        self.metrics.success(reason or "stop")
        self.metrics.e2e.observe(time.perf_counter() - started)
        return p.builder.full("".join(parts), reason, usage)

    async def _sse(
        self, p: Prepared, first: TokenDelta, events, started: float
    ) -> AsyncIterator[str]:
        b = p.builder
        try:
            if b.chat:
                yield b.chunk("", role=True)
            usage = Usage(len(p.prompt_ids))
            async for text, reason, step_usage in self._run(p, first, events):
                usage = step_usage
                if text:
                    yield b.chunk(text)
                if reason is not None:
                    yield b.chunk(None if b.chat else "", finish_reason=reason)
                    self.metrics.success(reason)
            if p.include_usage:
                yield b.usage_chunk(usage)
            self.metrics.e2e.observe(time.perf_counter() - started)
        except ServeError as e:
            self.metrics.error(e.http_status)
            yield sse_error(e.message, e.error_type, e.http_status)
        finally:
            await events.aclose()
        yield SSE_DONE


IngressDeployment = serve.deployment(Ingress, name="ingress")
