"""Builders for OpenAI response bodies and SSE stream chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from serving.api.errors import error_body


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True)
class ResponseBuilder:
    """Shapes one request's output (one of its choices) as a completion or a chat completion."""

    request_id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))
    index: int = 0  # of the choice this builder shapes (n > 1: one builder per choice)

    def _envelope(self, stream: bool) -> dict:
        if self.chat:
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def full(
        self,
        text: str | None,
        finish_reason: str | None,
        usage: Usage,
        logprobs: dict | None = None,
        tool_calls: list[dict] | None = None,
    ) -> dict:
        return self.response([self.choice(text, finish_reason, logprobs, tool_calls)], usage)

    def response(self, choices: list[dict], usage: Usage) -> dict:
        """The whole (non-streamed) response: one choice per `n`, in index order."""
        choices = sorted(choices, key=lambda c: c["index"])
        return self._envelope(False) | {"choices": choices, "usage": usage.as_dict()}

    def choice(
        self,
        text: str | None,
        finish_reason: str | None,
        logprobs: dict | None = None,
        tool_calls: list[dict] | None = None,
    ) -> dict:
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {
                "index": self.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return {
            "index": self.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        logprobs: dict | None = None,
        tool_calls: list[dict] | None = None,
    ) -> str:
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {
                "index": self.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": self.index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return sse(self._envelope(True) | {"choices": [choice]})

    def usage_chunk(self, usage: Usage) -> str:
        return sse(self._envelope(True) | {"choices": [], "usage": usage.as_dict()})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(message: str, error_type: str, code: int | str) -> str:
    return sse(error_body(message, error_type, None, code))


SSE_DONE = "data: [DONE]\n\n"
