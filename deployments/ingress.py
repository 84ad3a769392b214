"""Ingress deployment: the OpenAI-compatible HTTP API in front of prefill and decode.

Per request: validate, tokenize (`serving.api.prepare`) → admission → scheduler.route →
prefill (first token, KV into the store) → decode (streamed back through `DecodeMux`) →
detokenize, stop strings → SSE or one JSON body. Errors: `serving.api.http_errors`.
"""

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
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
from deployments.resumable_stream import ResumableStream
from deployments.scheduler import scheduler_actor
from deployments.sessions import conversation_start, session_id
from deployments.subscribers import subscriber_name
from serving.api.auth import ApiKeyAuth, Auth
from serving.api.detokenizer import IncrementalDetokenizer
from serving.api.errors import (
    BadRequest,
    RequestTimeout,
    ServeError,
    TooManyRequests,
    Unavailable,
    is_server_fault,
)
from serving.api.http_errors import install_error_handlers, internal_error
from serving.api.limits import Limits, RequestLimits
from serving.api.prepare import (
    ModelInfo,
    Prepared,
    PrepareOptions,
    check_model,
    choices,
    prepare,
)
from serving.api.protocol import parse_json_body, read_json_body
from serving.api.responses import SSE_DONE, Usage, sse_error
from serving.api.stream_merge import merge
from serving.api.tokenize import detokenize, tokenize
from serving.config import InferosConfig
from serving.logging_setup import configure_logging
from serving.messages import DecodeRequest, PrefillRequest, PrefillResult, RoutePlan, TokenDelta
from serving.metrics import FrontendMetrics
from serving.models.hf_folder import resolve_model_path, served_model_name
from serving.structured.engine_grammar import LazyEngineGrammar, build_engine_grammar
from serving.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)
T = TypeVar("T")
# a started choice: its request, first token and the rest of its token stream
ChoiceRun = tuple[Prepared, TokenDelta, AsyncIterator[TokenDelta]]
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
        self.prefill = prefill
        self.decode = decode
        self.scheduler = scheduler_actor(config)
        self.kv_store = kv_store_actor(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # decode streams go to this name; decode aborts them once it names no live actor
        self.subscriber_id = subscriber_name()
        self.mux = DecodeMux(decode, self.subscriber_id, self._replica_lost)
        self.metrics = FrontendMetrics(self.model_name, self.replica_id)
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
        self._cleanups: set[asyncio.Task] = set()
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
        # Counted out in `_generate`'s finally, which runs however the request ends (the
        # streaming response closes its generator: `ClosingStreamingResponse`), or below
        # when the request is refused before `_generate` starts.
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
        self._count_in(prepared.n - 1)  # every choice is counted out by its `_generate`
        runs = await self._start_choices(prepared, started)
        if prepared.stream:
            return ClosingStreamingResponse(
                self._sse(prepared, runs, started), media_type="text/event-stream"
            )
        return JSONResponse(await self._collect(prepared, runs, started))

    async def _start_choices(self, p: Prepared, started: float) -> list[ChoiceRun]:
        """Start every choice (n > 1: on one decode replica, which computes the prompt once)
        and wait for each one's first token: routing and prefill errors surface here, as
        the HTTP status, with every choice that did start aborted."""
        each = choices(p)
        if len(each) > 1:  # one route for all: the prompt's KV is shared on one engine
            for choice in each:
                choice.session_id = p.session_id or p.req_id
        streams = [self._generate(choice, started) for choice in each]
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failure is not None:
            for stream in streams:
                await stream.aclose()
            raise failure
        return list(zip(each, firsts, streams, strict=True))  # type: ignore[arg-type]

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

    async def _generate(self, p: Prepared, started: float) -> AsyncIterator[TokenDelta]:
        """Routes, prefills and decodes one request; yields its token deltas. A decode
        replica dying under the request does not end it: `ResumableStream` resumes it on
        another (or the restarted) replica."""
        plan: RoutePlan | None = None
        stream: ResumableStream | None = None
        deltas: AsyncIterator[TokenDelta] | None = None
        finished = False
        kv_key = None
        failed = False  # a server-side failure: counts against the error rate (fallback)
        try:
            plan = await self.scheduler.route.remote(p.req_id, len(p.prompt_ids), p.session_id)
            if plan is None:
                raise Unavailable("no decode replica is ready yet; retry shortly")
            deadline = started + (self.config.scheduling.request_timeout_s or float("inf"))
            first: TokenDelta | None = None
            if plan.prefill_replica is not None:
                try:
                    first, kv_key = await self._within(
                        self._prefill(p, plan.prefill_replica, plan.prefill_threads), deadline
                    )
                except RayError:  # the prefill replica died: the decode replica prefills
                    logger.warning("prefill replica %s failed", plan.prefill_replica)
                    self.scheduler.forget.remote(plan.prefill_replica)
                if first is not None and first.finished:
                    finished = True
                    yield first
                    return
            stream = self._decode_stream(p, plan, first, kv_key, deadline)
            deltas = aiter(stream)
            if first is None:  # the decode replica prefills: its first delta is the TTFT
                first = await anext(deltas)
                if first.error is not None:
                    raise Unavailable(f"decode failed: {first.error}")
            self.metrics.ttft.observe(time.perf_counter() - started)
            finished = first.finished
            yield first
            async for delta in deltas:
                finished = delta.finished
                failed = failed or delta.error is not None
                yield delta
        except RayError as e:  # a replica or actor died under the request
            failed = True
            raise Unavailable("a replica failed while serving the request; retry") from e
        except Exception as e:  # a timeout is load and a 4xx the client's: neither counts
            failed = failed or is_server_fault(e)
            raise
        finally:
            if deltas is not None:
                await deltas.aclose()
            self._done()
            self.mux.close(p.req_id)
            if plan is not None:
                decode_replica = stream.replica if stream is not None else plan.decode_replica
                self._clean_up(p.req_id, decode_replica, kv_key, not finished, failed)

    def _decode_stream(
        self,
        p: Prepared,
        plan: RoutePlan,
        first: TokenDelta | None,
        kv_key: str | None,
        deadline: float,
    ) -> ResumableStream:
        """Decode after the prefill replica's `first` token and KV, or (both None) decode
        with the decode replica prefilling."""
        request = DecodeRequest(
            p.req_id,
            p.prompt_ids,
            first.token_ids[0] if first is not None else None,
            p.params,
            kv_key,
            self.subscriber_id,
            store_turn=hasattr(p.request, "messages"),
            prompt_group=p.prompt_group,
            group_size=p.group_size,
        )
        scheduling = self.config.scheduling
        return ResumableStream(
            request,
            plan.decode_replica,
            self.mux,
            self.decode,
            self.scheduler,
            lambda awaitable: self._within(awaitable, deadline),
            p.session_id,
            scheduling.failover_wait_s,
            scheduling.failover_max_resumes,
            self.metrics.stream_resumes.inc,
        )

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
        self, req_id: str, decode_replica: str, kv_key: str | None, aborted: bool, failed: bool
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
                await self.decode.abort.remote(req_id, replica_id=decode_replica)
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
        first = self._with_prefill_logprobs(first, result)
        return first, result.kv_key

    async def _run(self, p: Prepared, first: TokenDelta, events: AsyncIterator[TokenDelta]):
        """Shared by streaming and non-streaming: yields (text, finish_reason, usage)."""
        detok = IncrementalDetokenizer(
            self.tokenizer, p.prompt_ids, p.params.stop, p.params.include_stop_str_in_output
        )
        usage = Usage(prompt_tokens=len(p.prompt_ids))
        if p.builder.index == 0:  # the choices of a request share its prompt
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
            text = self._add_logprobs_and_echo(p, delta, text, delta is first)
            if detok.stopped:
                yield text, "stop", usage
                return
            if delta.finished:
                yield text + detok.flush(), delta.finish_reason, usage
                return
            yield text, None, usage
            delta = await anext(events, None)
        raise Unavailable("the decode stream ended early")

    async def _collect(self, p: Prepared, runs: list[ChoiceRun], started: float) -> dict:
        tasks = [asyncio.ensure_future(self._collect_choice(*run)) for run in runs]
        try:
            done = await asyncio.gather(*tasks)
        finally:  # one choice failed (or the client left): the others are aborted
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _, _, events in runs:
                await events.aclose()
        completion_tokens = sum(usage.completion_tokens for _, usage in done)
        self.metrics.e2e.observe(time.perf_counter() - started)
        return p.builder.response(
            [choice for choice, _ in done], Usage(len(p.prompt_ids), completion_tokens)
        )

    async def _collect_choice(
        self, p: Prepared, first: TokenDelta, events: AsyncIterator[TokenDelta]
    ) -> tuple[dict, Usage]:
        parts: list[str] = []
        reason, usage = None, Usage(len(p.prompt_ids))
        async for text, step_reason, step_usage in self._run(p, first, events):
            parts.append(text)
            reason, usage = step_reason, step_usage
        text: str | None = "".join(parts)
        tool_calls = None
        if p.tool_output is not None:  # the answer's tool calls, out of its text
            text, tool_calls, reason = p.tool_output.whole(text or "", reason)
        self.metrics.success(reason or "stop")
        return p.builder.choice(text, reason, self._take_logprobs(p), tool_calls), usage

    async def _sse(self, p: Prepared, runs: list[ChoiceRun], started: float) -> AsyncIterator[str]:
        usages = {c.builder.index: Usage(len(p.prompt_ids)) for c, _, _ in runs}
        chunks = [self._choice_chunks(c, first, events, usages) for c, first, events in runs]
        try:
            async for chunk in chunks[0] if len(chunks) == 1 else merge(chunks):
                yield chunk
            if p.include_usage:
                total = sum(u.completion_tokens for u in usages.values())
                yield p.builder.usage_chunk(Usage(len(p.prompt_ids), total))
            self.metrics.e2e.observe(time.perf_counter() - started)
        except Exception as e:  # the status is sent already: the error goes in the stream
            err = e if isinstance(e, ServeError) else internal_error()
            self.metrics.error(err.http_status)
            yield sse_error(err.message, err.error_type, err.http_status)
        finally:
            for chunk_stream in chunks:
                await chunk_stream.aclose()
            for _, _, events in runs:
                await events.aclose()
        yield SSE_DONE

    async def _choice_chunks(
        self,
        p: Prepared,
        first: TokenDelta,
        events: AsyncIterator[TokenDelta],
        usages: dict[int, Usage],
    ) -> AsyncIterator[str]:
        """One choice's SSE chunks; its usage goes into `usages` at its index."""
        b = p.builder
        if b.chat:
            yield b.chunk("", role=True)
        async for text, reason, step_usage in self._run(p, first, events):
            usages[b.index] = step_usage
            if p.tool_output is not None:  # tool calls out of the text, as deltas
                chunks, reason = self._tool_chunks(p, text, reason)
                for chunk in chunks:
                    yield chunk
            elif text:
                yield b.chunk(text, logprobs=self._take_logprobs(p))
            if reason is not None:
                yield b.chunk(None if b.chat else "", reason, logprobs=self._take_logprobs(p))
                self.metrics.success(reason)

    def _tool_chunks(
        self, p: Prepared, text: str, reason: str | None
    ) -> tuple[list[str], str | None]:
        """A streamed piece of a request with tools: its content and tool-call chunks (the
        parser holds what may be a call), all that is held once it ends, and its finish
        reason (`tool_calls` where it called one)."""
        assert p.tool_output is not None
        pieces = p.tool_output.feed(text) if text else []
        if reason is not None:
            rest, reason = p.tool_output.finish(reason)
            pieces += rest
        chunks = [
            p.builder.chunk(
                piece.get("content"),
                logprobs=self._take_logprobs(p),
                tool_calls=piece.get("tool_calls"),
            )
            for piece in pieces
        ]
        return chunks, reason

    # --- logprobs and echo ------------------------------------------------------------
    @staticmethod
    def _with_prefill_logprobs(first: TokenDelta, result: PrefillResult) -> TokenDelta:
        if result.logprobs is None and result.prompt_logprobs is None:
            return first
        return replace(first, logprobs=result.logprobs, prompt_logprobs=result.prompt_logprobs)

    @staticmethod
    def _add_logprobs_and_echo(p: Prepared, delta: TokenDelta, text: str, first: bool) -> str:
        """Hands `delta`'s logprobs to the request's renderer (where it asked for them,
        the prompt's first with `echo`); returns `text`, after the prompt on the first."""
        if p.logprobs is not None:
            if first and p.echo_text is not None and delta.prompt_logprobs is not None:
                p.logprobs.add(p.prompt_ids, delta.prompt_logprobs)
            if delta.logprobs is not None:
                p.logprobs.add(delta.token_ids, delta.logprobs)
        return p.echo_text + text if first and p.echo_text is not None else text

    @staticmethod
    def _take_logprobs(p: Prepared) -> dict | None:
        return p.logprobs.take() if p.logprobs is not None else None


IngressDeployment = serve.deployment(Ingress, name="ingress")
