"""Request fields that OpenAI or vLLM define and this server does not implement (pure).

A client that sets one gets a 400 naming it, never a 200 that quietly ignored it: JSON asked
for through `response_format` and answered with free text, or `tools` answered without a
tool call, looks like success and is wrong.

A field is "not used" when it is absent, null, or one of the values its row lists: what
client libraries send as their defaults (`n: 1`, `logprobs: false`, `presence_penalty: 0`,
`skip_special_tokens: true`) changes nothing and is accepted.

Accepted without a row, as vLLM does:
- fields neither API defines (ignored);
- fields that change nothing in what is generated or returned: `user`, `metadata`,
  `prompt_cache_key`, `safety_identifier`;
- modifiers of a refused feature, which change nothing alone: `length_penalty` (beam
  search), `spaces_between_special_tokens` (`skip_special_tokens: false`),
  `guided_decoding_backend` and `guided_whitespace_pattern` (the server's grammar
  engine and whitespace rule apply),
  `include_reasoning`, `mm_processor_kwargs`.

To support a field, implement it and delete its row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from serving.api.errors import BadRequest


class Api(Enum):
    """The request bodies checked here."""

    CHAT = "POST /v1/chat/completions"
    COMPLETION = "POST /v1/completions"
    TOKENIZE_CHAT = "POST /tokenize with messages"


GENERATE = frozenset({Api.CHAT, Api.COMPLETION})
CHAT = frozenset({Api.CHAT})
COMPLETION = frozenset({Api.COMPLETION})
TEMPLATE = frozenset({Api.CHAT, Api.TOKENIZE_CHAT})  # fields that shape the chat template


@dataclass(frozen=True, slots=True)
class Unsupported:
    field: str  # dotted for a nested field: "stream_options.continuous_usage_stats"
    unused: tuple[Any, ...]  # values that change nothing, besides absent and null
    apis: frozenset[Api]
    why: str  # what is missing, for the message

    def is_unused(self, value: Any) -> bool:
        return value is None or any(_same(value, u) for u in self.unused)

    def message(self, value: Any) -> str:
        sent = f" = {_show(value)}" if isinstance(value, int | float | str) else ""
        instead = " or ".join(json.dumps(u) for u in self.unused)
        return (
            f"`{self.field}`{sent} is not supported by this server ({self.why}); "
            f"leave it out{f' or send {instead}' if instead else ''}"
        )


_TOOLS = "the deprecated functions API; send `tools` and `tool_choice`"
_STRUCTURED = "structural tags are not implemented; use `structured_outputs`"
_TEMPLATE = "the server's chat template is the only one used"
_LAST_USAGE = "usage comes once, in the last chunk (stream_options.include_usage)"

UNSUPPORTED_FIELDS: tuple[Unsupported, ...] = (
    # OpenAI
    Unsupported("best_of", (1,), GENERATE, "as vLLM v1: send n and pick among the choices"),
    Unsupported("echo", (False,), CHAT, "chat does not echo the last message"),
    Unsupported("suffix", ("",), COMPLETION, "no fill-in-the-middle"),
    Unsupported("functions", ([],), CHAT, _TOOLS),
    Unsupported("function_call", ("none",), CHAT, _TOOLS),
    Unsupported("reasoning_effort", (), CHAT, "the model does not reason"),
    Unsupported("verbosity", (), CHAT, "the model has no verbosity setting"),
    Unsupported("modalities", (["text"],), CHAT, "text output only"),
    Unsupported("audio", (), CHAT, "text output only"),
    Unsupported("prediction", (), CHAT, "predicted outputs are not implemented"),
    Unsupported("web_search_options", (), CHAT, "no web search"),
    Unsupported("store", (False,), CHAT, "completions are not stored"),
    Unsupported("service_tier", ("auto", "default"), CHAT, "one service tier"),
    Unsupported("stream_options.continuous_usage_stats", (False,), GENERATE, _LAST_USAGE),
    # vLLM's extras
    Unsupported("allowed_token_ids", (), GENERATE, "allowed_token_ids is not implemented"),
    Unsupported("prompt_logprobs", (), GENERATE, "prompt logprobs come with `echo`"),
    Unsupported("return_tokens_as_token_ids", (False,), GENERATE, "tokens come as text"),
    Unsupported("skip_special_tokens", (True,), GENERATE, "special tokens are always skipped"),
    Unsupported("truncate_prompt_tokens", (), GENERATE, "prompts are never truncated"),
    Unsupported("use_beam_search", (False,), GENERATE, "no beam search"),
    Unsupported("structural_tag", (), GENERATE, _STRUCTURED),
    Unsupported("logits_processors", ([],), GENERATE, "no custom logits processors"),
    Unsupported("return_token_ids", (False,), GENERATE, "token ids are not returned"),
    Unsupported("prompt_embeds", (), COMPLETION, "prompts are text or token ids"),
    Unsupported("priority", (0,), GENERATE, "no priority scheduling"),
    Unsupported("request_id", (), GENERATE, "the server names each request"),
    Unsupported("cache_salt", (), GENERATE, "the prefix cache is not salted per request"),
    Unsupported("kv_transfer_params", (), GENERATE, "KV transfer is the server's own"),
    Unsupported("vllm_xargs", ({},), GENERATE, "no custom extensions"),
    Unsupported("continue_final_message", (False,), TEMPLATE, "not implemented yet"),
    Unsupported("documents", ([],), CHAT, _TEMPLATE),
    Unsupported("chat_template", (), TEMPLATE, _TEMPLATE),
    Unsupported("chat_template_kwargs", ({},), TEMPLATE, _TEMPLATE),
)

# In chat history: what only the deprecated functions API produces.
UNSUPPORTED_MESSAGE_FIELDS: tuple[Unsupported, ...] = (
    Unsupported("function_call", (), TEMPLATE, _TOOLS),
)
UNSUPPORTED_ROLES = ("function",)


def check_unsupported(body: dict, api: Api) -> None:
    """A 400 naming the first field of `body` that `api` defines and this server does not
    implement; unknown fields pass."""
    for row in UNSUPPORTED_FIELDS:
        if api in row.apis:
            value = _lookup(body, row.field)
            if not row.is_unused(value):
                raise BadRequest(row.message(value), param=row.field)
    if api in TEMPLATE:
        _check_messages(body.get("messages"))


def _check_messages(messages: Any) -> None:
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue  # the request model has refused it already
        if message.get("role") in UNSUPPORTED_ROLES:
            raise BadRequest(
                f"`messages.{i}.role` = {_show(message['role'])} is not supported by this "
                f"server ({_TOOLS}); send results as `tool` messages",
                param=f"messages.{i}.role",
            )
        for row in UNSUPPORTED_MESSAGE_FIELDS:
            value = message.get(row.field)
            if not row.is_unused(value):
                raise BadRequest(
                    f"`messages.{i}.{row.field}` is not supported by this server ({row.why}); "
                    "send calls as `tool_calls`",
                    param=f"messages.{i}.{row.field}",
                )


def _lookup(body: dict, dotted: str) -> Any:
    value: Any = body
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _same(value: Any, unused: Any) -> bool:
    # JSON `true` is not `1`, nor `false` `0`, although Python's == says so.
    return isinstance(value, bool) == isinstance(unused, bool) and value == unused


def _show(value: Any, limit: int = 64) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"
