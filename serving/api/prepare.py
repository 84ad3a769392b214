"""Validation of one OpenAI request before anything runs (pure: no Ray, no HTTP).

    prepare(body, chat, tokenizer, model, options) -> Prepared
        fields parse (400 naming the field) -> the model is ours (404) -> no field OpenAI or
        vLLM defines that we do not implement (400 naming it, `serving.api.unsupported`)
        -> token ids within the vocabulary (400: `stop_token_ids`, `logit_bias`, a prompt of
        ids) -> tools and tool_choice (400) -> chat template (with the tools), tokenize ->
        prompt + max_tokens within the context (400 `context_length_exceeded`) ->
        `bad_words` tokenized -> the output's grammar (structured output, or the tool
        call a choice asks for) checked and compiled (400 naming the field)

Whatever a client can get wrong is refused here with a 4xx, before routing: nothing it
sends reaches an engine step shared with other requests (an out-of-vocabulary stop token
id with `min_tokens` made the step raise and failed the whole batch), and a client's
mistake never counts against the server's error rate.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from serving.api.errors import BadRequest, ContextLengthExceeded, UnknownModel
from serving.api.logprobs import LogprobsRenderer
from serving.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from serving.api.responses import ResponseBuilder
from serving.api.structured import CompileCheck, check_compiles, structured_spec
from serving.api.tool_output import ToolOutput
from serving.api.tools import ToolPlan, conversation, tool_plan
from serving.api.unsupported import Api, check_unsupported
from serving.engine.sampling_params import SamplingParams
from serving.structured.spec import StructuredSpec

MAX_ECHOED_CHARS = 64  # of a client's string quoted back in an error message
MAX_CHOICES = 32  # n: each choice is a sequence in the engine's batch
MAX_LOGIT_BIAS = 100.0  # biases are clamped to ±this, as OpenAI and vLLM do

OpenAIRequest = ChatCompletionRequest | CompletionRequest
M = TypeVar("M", bound=BaseModel)


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that validation uses."""

    def __len__(self) -> int: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What validation needs to know of the served model."""

    name: str
    max_model_len: int
    vocab_size: int  # token ids in [0, vocab_size) are valid wherever a request gives ids

    @classmethod
    def of(cls, name: str, max_model_len: int, tokenizer: Tokenizer, folder: Path) -> ModelInfo:
        """The vocabulary is what both the tokenizer and the model know: ids past the
        tokenizer cannot be detokenized, ids past the model's logits cannot be indexed."""
        vocab_size = len(tokenizer)
        config = folder / "config.json"
        if config.is_file():
            model_vocab = json.loads(config.read_text()).get("vocab_size", vocab_size)
            vocab_size = min(vocab_size, model_vocab)
        return cls(name, max_model_len, vocab_size)


@dataclass(frozen=True, slots=True)
class PrepareOptions:
    """The server's settings that validation follows."""

    # the grammar engine's compile (through a cache): refusals are 400s here, not failures
    # on a replica; None: the spec is only checked without a tokenizer
    compile_check: CompileCheck | None = None
    tool_call_parser: str = "hermes"
    enable_auto_tool_choice: bool = True


@dataclass(slots=True)
class Prepared:
    """A validated request, ready to run."""

    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    builder: ResponseBuilder
    stream: bool
    include_usage: bool
    request: OpenAIRequest
    user: str | None = None
    conversation_start: str = ""  # what every turn of one conversation starts with
    session_id: str | None = None  # routing affinity across a conversation's turns
    logprobs: LogprobsRenderer | None = None  # set where the request asks for logprobs
    echo_text: str | None = None  # completions with `echo`: the prompt, before the answer
    tool_output: ToolOutput | None = None  # chat with tools (not tool_choice none)
    n: int = 1  # the request's choices; `choices()` makes one Prepared per choice
    # the choices of one request share the prompt's KV on their engine (its request id)
    prompt_group: str | None = None


def prepare(
    body: dict,
    chat: bool,
    tokenizer: Tokenizer,
    model: ModelInfo,
    options: PrepareOptions = PrepareOptions(),
) -> Prepared:
    """Validate `body` (a JSON object) as a chat or completion request; raises a
    `ServeError` with a 4xx status for anything wrong."""
    req = parse_request(body, chat)
    check_model(req.model, model)
    check_unsupported(body, Api.CHAT if chat else Api.COMPLETION)
    check_token_ids(req.stop_token_ids or (), model.vocab_size, "stop_token_ids")
    logit_bias = check_logit_bias(req.logit_bias, model.vocab_size)
    echo_text = None
    tools: ToolPlan | None = None
    if isinstance(req, ChatCompletionRequest):
        tools = tool_plan(req, options.tool_call_parser, options.enable_auto_tool_choice)
        prompt_ids = render_chat(
            req.messages,
            tokenizer,
            req.add_generation_prompt,
            req.add_special_tokens,
            tools.tools if tools is not None else None,
        )
        requested = req.requested_max_tokens()
    else:
        prompt = req.single_prompt()
        if isinstance(prompt, list):
            check_token_ids(prompt, model.vocab_size, "prompt")
            prompt_ids = list(prompt)
        else:
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
        requested = req.max_tokens
        if req.echo:
            echo_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    if not prompt_ids:
        raise BadRequest("the prompt is empty", param="prompt")
    n = req.n or 1
    if n > MAX_CHOICES:
        raise BadRequest(f"n is {n}; at most {MAX_CHOICES} choices per request", param="n")
    max_tokens = check_context(len(prompt_ids), requested, model.max_model_len, chat)
    # The response id is the request id everywhere (logs, kv_store keys), as in vLLM.
    req_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    params = replace(
        req.sampling_params(max_tokens),
        logit_bias=logit_bias,
        bad_words_ids=bad_words_ids(req.bad_words or [], tokenizer, model.vocab_size),
        structured=output_constraint(req, tools, options.compile_check),
    )
    return Prepared(
        req_id=req_id,
        prompt_ids=prompt_ids,
        params=params,
        builder=ResponseBuilder(req_id, model.name, chat),
        stream=req.stream,
        include_usage=req.include_usage,
        request=req,
        user=req.user,
        logprobs=LogprobsRenderer(tokenizer, chat) if params.logprobs is not None else None,
        echo_text=echo_text,
        tool_output=ToolOutput(tools) if tools is not None and tools.mode != "none" else None,
        n=n,
    )


def choices(p: Prepared) -> list[Prepared]:
    """One request per choice (n > 1), as vLLM v1 fans a request out: each has its own id
    (`<id>-<index>`, the response keeps the request's), index, per-request state (logprobs,
    tool-call reader) and, with a `seed`, seed + index, so the choices are reproducible and
    differ; all of them name the request as their prompt group, so the engine computes the
    prompt once and the choices share its KV blocks."""
    if p.n == 1:
        return [p]
    seed = p.params.seed
    return [
        replace(
            p,
            req_id=f"{p.req_id}-{i}",
            params=replace(p.params, seed=None if seed is None else seed + i),
            builder=replace(p.builder, index=i),
            logprobs=p.logprobs.fresh() if p.logprobs is not None else None,
            tool_output=ToolOutput(p.tool_output.plan) if p.tool_output is not None else None,
            prompt_group=p.req_id,
        )
        for i in range(p.n)
    ]


def output_constraint(
    req: OpenAIRequest, tools: ToolPlan | None, compile_check: CompileCheck | None
) -> StructuredSpec | None:
    """The grammar the output must match: the request's structured output, or the tool
    call(s) `tool_choice` required or a named function asks for (not both: a 400)."""
    spec = structured_spec(req)
    tool_spec = tools.spec() if tools is not None else None
    if spec is not None and tool_spec is not None:
        raise BadRequest(
            f"`tool_choice` {tools.mode if tools else ''} and structured output both "  # noqa
            "constrain the answer; send one of them",
            param="tool_choice",
        )
    if tool_spec is not None:
        check_compiles(tool_spec, compile_check, "tools")
        return tool_spec
    if spec is not None:
        check_compiles(spec, compile_check, _constraint_field(req))
    return spec


def _constraint_field(req: OpenAIRequest) -> str:
    if req.response_format is not None:
        return "response_format"
    if req.structured_outputs is not None:
        return "structured_outputs"
    guided = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    return next((g for g in guided if getattr(req, g) is not None), "structured_outputs")


def parse_request(body: dict, chat: bool) -> OpenAIRequest:
    return parse_as(ChatCompletionRequest if chat else CompletionRequest, body)


def parse_as(model_cls: type[M], body: dict) -> M:
    """`body` as `model_cls`; the first field error as a 400 naming that field."""
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def check_model(name: str | None, model: ModelInfo) -> None:
    """A 404 unless `name` is the served model; None (where the API lets it be left out,
    as vLLM's /tokenize does) means the served model."""
    if name is not None and name != model.name:
        raise UnknownModel(
            f"The model `{_clip(name)}` does not exist; this server serves `{model.name}`.",
            param="model",
        )


def check_token_ids(ids: list[int] | tuple[int, ...], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(
            f"{param}: token id {_clip(str(bad))} is out of the vocabulary "
            f"(valid ids: 0 to {vocab_size - 1})",
            param=param,
        )


def check_logit_bias(
    bias: dict[str, float] | None, vocab_size: int
) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs: ids are decimal strings within the
    vocabulary (400 otherwise), biases clamped to ±100."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequest(
                f"logit_bias: key {_clip(json.dumps(key))} is not a token id (a decimal string)",
                param="logit_bias",
            ) from None
        check_token_ids([token], vocab_size, "logit_bias")
        pairs.append((token, max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(value)))))
    return tuple(pairs)


def bad_words_ids(
    words: list[str], tokenizer: Tokenizer, vocab_size: int
) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of `bad_words`: each word as written (leading spaces stripped)
    and with one leading space, as it appears mid-sentence, where that starts with another
    token and has as many."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        candidates = [plain]
        if plain and spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            candidates.append(spaced)
        for ids in candidates:
            if ids and ids not in out:
                check_token_ids(ids, vocab_size, "bad_words")
                out.append(ids)
    return tuple(out)


def render_chat(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
    tools: tuple[dict, ...] | None = None,
) -> list[int]:
    """The prompt ids of a conversation: chat completions and /tokenize both use this, so
    /tokenize counts what a chat request's `usage.prompt_tokens` will say. Special tokens
    come from the template; `add_special_tokens` (vLLM's, default off) adds the
    tokenizer's own on top. Tool calls, tool results and `tools` reach the template with
    their fields (`serving.api.tools.conversation`)."""
    messages_in = conversation(messages, tools, tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            messages_in,
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise BadRequest(f"chat template failed: {_clip(str(e), 200)}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_context(num_prompt: int, requested: int | None, max_model_len: int, chat: bool) -> int:
    """max_tokens to run with: the request's, or all the context leaves; a 400 beyond it."""
    max_tokens = requested if requested is not None else max_model_len - num_prompt
    if num_prompt + max_tokens > max_model_len or max_tokens < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {num_prompt + max(max_tokens, 0)} tokens "
            f"({num_prompt} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param="max_tokens" if requested else "messages" if chat else "prompt",
        )
    return max_tokens


def _clip(text: str, limit: int = MAX_ECHOED_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
