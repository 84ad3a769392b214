"""What every tool-call parser produces, whole (`parse`) or streamed (`feed` / `finish`)."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"  # vLLM's id shape


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole answer: `content` is the text outside the calls (None when there is none)."""

    content: str | None
    tool_calls: list[ToolCall]

    @property
    def finish_reason(self) -> str | None:
        return "tool_calls" if self.tool_calls else None


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One complete call, sent as one streamed delta (clients accumulate deltas by
    `index`, so one delta holding the whole call is a valid stream)."""

    index: int
    call: ToolCall

    def to_openai(self) -> dict:
        return {"index": self.index, **self.call.to_openai()}


StreamDelta = ContentDelta | ToolCallDelta


def call_from_json(value: Any) -> ToolCall | None:
    """`{"name": ..., "arguments" | "parameters": {...}}` → a call; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments' text already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    """Per request: `parse` a whole answer, or `feed` its text as it streams and `finish`."""

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput: ...

    @abstractmethod
    def feed(self, text: str) -> list[StreamDelta]: ...

    @abstractmethod
    def finish(self) -> list[StreamDelta]: ...

    @property
    def num_calls(self) -> int:
        """Calls streamed so far (so the last chunk's finish reason is `tool_calls`)."""
        return self._num_calls

    _num_calls = 0
