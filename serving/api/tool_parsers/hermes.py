"""Hermes-style calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any
number, with free text around them (vLLM's `hermes` parser)."""

from __future__ import annotations

import json
import re

from serving.api.tool_parsers.base import (
    ContentDelta,
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    call_from_json,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# a call cut by max_tokens has no closing tag: what follows the last opening tag is tried
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)


def _parse_call(body: str) -> ToolCall | None:
    try:
        return call_from_json(json.loads(body.strip()))
    except json.JSONDecodeError:
        return None


class HermesToolParser(ToolParser):
    def __init__(self) -> None:
        self._buffer = ""  # text not sent yet: a tag's possible start, or a call's body
        self._in_call = False
        self._num_calls = 0

    def parse(self, text: str) -> ParsedOutput:
        if OPEN not in text:
            return ParsedOutput(text, [])
        calls = [c for c in (_parse_call(m.group(1)) for m in _CALL.finditer(text)) if c]
        if not calls:  # tags without a valid call: the text is the answer, as written
            return ParsedOutput(text, [])
        content = text[: text.index(OPEN)].strip()
        return ParsedOutput(content or None, calls)

    def feed(self, text: str) -> list[StreamDelta]:
        self._buffer += text
        out: list[StreamDelta] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return out
                out += self._call(self._buffer[:end])
                self._buffer = self._buffer[end + len(CLOSE) :]
                self._in_call = False
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                if start:
                    out.append(ContentDelta(self._buffer[:start]))
                self._buffer = self._buffer[start + len(OPEN) :]
                self._in_call = True
                continue
            # send all but a tail that could be the start of a tag
            keep = _partial_tag_length(self._buffer)
            if len(self._buffer) > keep:
                out.append(ContentDelta(self._buffer[: len(self._buffer) - keep]))
                self._buffer = self._buffer[len(self._buffer) - keep :]
            return out

    def finish(self) -> list[StreamDelta]:
        rest, self._buffer = self._buffer, ""
        if self._in_call:  # cut before its closing tag: a call if it parses, else text
            self._in_call = False
            calls = self._call(rest)
            return calls or [ContentDelta(OPEN + rest)]
        return [ContentDelta(rest)] if rest else []

    def _call(self, body: str) -> list[StreamDelta]:
        call = _parse_call(body)
        if call is None:  # not a call after all: the model's text, as written
            return [ContentDelta(OPEN + body + CLOSE)]
        self._num_calls += 1
        return [ToolCallDelta(self._num_calls - 1, call)]


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `<tool_call>`."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
