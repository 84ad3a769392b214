"""Tool calling, response side: the model's text → `message.tool_calls` (whole) or
tool-call deltas (streamed), per the request's `ToolPlan`.

Streamed, a call goes out in OpenAI's chunk shape, `delta.tool_calls[i]` with `index`,
`id`, `type`, `function.name` and `function.arguments`; clients accumulate `arguments`
per index. A named function's arguments stream as they are generated (the output is the
arguments); the parsers' calls go out whole, once each is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.api.tool_parsers import ContentDelta, ToolCall, ToolParser, get_tool_parser
from serving.api.tool_parsers.base import new_call_id
from serving.api.tools import ToolPlan

# What one streamed piece holds: {"content": text} or {"tool_calls": [delta, ...]}
Piece = dict[str, Any]


@dataclass(slots=True)
class ToolOutput:
    """One request's reader of its answer (per-request state: create one per request)."""

    plan: ToolPlan
    _parser: ToolParser | None = None
    _call_id: str = field(default_factory=new_call_id)
    _named_started: bool = False
    _num_calls: int = 0

    def __post_init__(self) -> None:
        if self.plan.mode == "auto":
            self._parser = get_tool_parser(self.plan.parser)
        elif self.plan.mode == "required":
            self._parser = get_tool_parser("json")

    @property
    def active(self) -> bool:
        return self.plan.mode != "none"

    # --- whole answers --------------------------------------------------------------
    def whole(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls in OpenAI's shape, finish reason) of a whole answer."""
        if self.plan.mode == "none":
            return text, [], finish_reason
        if self.plan.mode == "named":
            call = ToolCall(self.plan.function or "", text, self._call_id)
            return None, [call.to_openai()], finish_reason
        assert self._parser is not None
        parsed = self._parser.parse(text)
        calls = [c.to_openai() for c in parsed.tool_calls]
        return parsed.content, calls, self._reason(finish_reason, len(calls))

    # --- streams --------------------------------------------------------------------
    def feed(self, text: str) -> list[Piece]:
        if self.plan.mode == "none":
            return [{"content": text}] if text else []
        if self.plan.mode == "named":
            return self._named_piece(text)
        assert self._parser is not None
        return self._pieces(self._parser.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[list[Piece], str | None]:
        """What the parser still held, and the stream's finish reason."""
        if self.plan.mode == "none":
            return [], finish_reason
        if self.plan.mode == "named":
            return self._named_piece("", force=not self._named_started), finish_reason
        assert self._parser is not None
        pieces = self._pieces(self._parser.finish())
        return pieces, self._reason(finish_reason, self._num_calls)

    def _named_piece(self, text: str, force: bool = False) -> list[Piece]:
        if not text and not force:
            return []
        delta: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
        if not self._named_started:
            self._named_started = True
            delta = {
                "index": 0,
                "id": self._call_id,
                "type": "function",
                "function": {"name": self.plan.function, "arguments": text},
            }
        return [{"tool_calls": [delta]}]

    def _pieces(self, deltas: list) -> list[Piece]:
        out: list[Piece] = []
        for d in deltas:
            if isinstance(d, ContentDelta):
                if d.text:
                    out.append({"content": d.text})
            else:
                self._num_calls += 1
                out.append({"tool_calls": [d.to_openai()]})
        return out

    def _reason(self, finish_reason: str | None, num_calls: int) -> str | None:
        # an answer that ended by itself with calls in it (auto and required; a named
        # function's ends with "stop", as OpenAI's does)
        if finish_reason == "stop" and num_calls:
            return "tool_calls"
        return finish_reason
