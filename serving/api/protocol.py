"""OpenAI request models for /v1/completions and /v1/chat/completions (plus vLLM's extras)."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.api.errors import BadRequest, InvalidText, UnsupportedMediaType
from serving.engine.sampling_params import SamplingParams

# Most logprobs per position a request may ask for (vLLM's default --max-logprobs; OpenAI
# allows 20 on chat and 5 on completions).
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so new clients work.
    # Fields we define but do not implement (best_of, suffix, ...) are typed here
    # and refused by `serving.api.unsupported` unless left at a value that changes nothing.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    n: int | None = Field(1, ge=1)  # null: the default, as vLLM reads it
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) → bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    min_p: float | None = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(1.0, gt=0.0)  # vLLM's; 1 = off
    bad_words: list[str] | None = None  # vLLM's
    include_stop_str_in_output: bool = False  # vLLM's
    user: str | None = None
    # Ours (pass with the openai client's extra_body): staged-KV profile for this request.
    kv_profile: Literal["baseline", "safe", "balanced", "aggressive"] | None = None
    # Structured output (`serving.api.structured`): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* names for the same.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            stop=self.stop_strings(),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_tokens),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logprobs=self.num_logprobs(),
            prompt_logprobs=self.num_prompt_logprobs(),
            kv_profile=self.kv_profile,
        )

    def num_logprobs(self) -> int | None:
        """Top logprobs per output token, or None for no logprobs."""
        return None

    def num_prompt_logprobs(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True  # vLLM's: the tokenizer's own (e.g. BOS) on a text prompt

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise BadRequest("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return p  # type: ignore[return-value]
        if len(p) == 1:
            return p[0]  # type: ignore[return-value]
        raise BadRequest(
            "batched prompts are not supported; send one prompt per request", param="prompt"
        )

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None  # echo scores the prompt too


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A tool call in an assistant message of the history (OpenAI's shape)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: which call this is the result of
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise BadRequest(
                    f"content part of type {part.get('type')!r} is not supported; only text",
                    param="messages",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    # None: "auto" with tools, "none" without (OpenAI's defaults)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # vLLM's: the tokenizer's own on top of the template's

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:  # vLLM's 400 too
            raise BadRequest("top_logprobs needs `logprobs: true`", param="top_logprobs")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any) -> str | None:
    """Where (a dotted path, "" for the top level) the first string holding a lone UTF-16
    surrogate is, or None. JSON may escape one (`"\\ud800"`), but it is no Unicode text:
    it cannot be encoded as UTF-8, so the tokenizer and the response renderer would fail."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:  # iterative: the body may be nested as deep as the JSON parser allows
        path, v = stack.pop()
        if isinstance(v, str):
            if _LONE_SURROGATE.search(v):
                return path
        elif isinstance(v, dict):
            for key, item in v.items():
                where = f"{path}.{key}" if path else str(key)
                if _LONE_SURROGATE.search(key):
                    return path
                stack.append((where, item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
    return None


def is_json_media_type(content_type: str | None) -> bool:
    """`application/json` (any parameters, e.g. charset) or `application/<x>+json`."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def parse_json_body(raw: bytes, content_type: str | None) -> dict:
    """A request body as a JSON object of valid Unicode text, or a 4xx.

    Only JSON is accepted (415 otherwise, a missing Content-Type included): a web page can
    send `text/plain`, a form or a typeless body to any address without the browser asking
    the server first (CORS "simple" requests), but not `application/json`."""
    if not is_json_media_type(content_type):
        raise UnsupportedMediaType(
            f"Content-Type {(content_type or '(none)')[:100]!r} is not supported; "
            "send the body as JSON with 'Content-Type: application/json'"
        )
    try:
        body = json.loads(raw)
    except Exception:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    where = lone_surrogate_at(body)
    if where is not None:
        raise InvalidText(
            f"{where or 'the body'}: not valid Unicode text (it holds a lone UTF-16 "
            "surrogate such as \\ud800); send well-formed UTF-8",
            param=where or None,
        )
    return body


async def read_json_body(request) -> dict:
    """The body of a Starlette request as a JSON object (`parse_json_body`), or a 4xx."""
    return parse_json_body(await request.body(), request.headers.get("content-type"))
