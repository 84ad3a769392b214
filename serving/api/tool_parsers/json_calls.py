"""The whole answer is a call or a list of calls in JSON: `{"name": ..., "arguments" |
"parameters": {...}}` (Llama 3's JSON format, and what `tool_choice` `required` or a named
function constrains the output to)."""

from __future__ import annotations

import json

from serving.api.tool_parsers.base import (
    ContentDelta,
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    call_from_json,
)


def _calls(text: str) -> list[ToolCall] | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    values = value if isinstance(value, list) else [value]
    calls = [call_from_json(v) for v in values]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


class JsonToolParser(ToolParser):
    def __init__(self) -> None:
        self._buffer = ""
        self._holding: bool | None = None  # None until the first non-space character
        self._num_calls = 0

    def parse(self, text: str) -> ParsedOutput:
        calls = _calls(text)
        return ParsedOutput(None, calls) if calls else ParsedOutput(text, [])

    def feed(self, text: str) -> list[StreamDelta]:
        """Text that starts like JSON is held until the end (a call is known only once it
        parses); any other answer streams as it comes."""
        self._buffer += text
        if self._holding is None and self._buffer.strip():
            self._holding = self._buffer.lstrip()[0] in "{["
        if self._holding is False:
            out, self._buffer = self._buffer, ""
            return [ContentDelta(out)] if out else []
        return []

    def finish(self) -> list[StreamDelta]:
        rest, self._buffer = self._buffer, ""
        calls = _calls(rest) if self._holding else None
        if not calls:
            return [ContentDelta(rest)] if rest else []
        self._num_calls = len(calls)
        return [ToolCallDelta(i, c) for i, c in enumerate(calls)]
