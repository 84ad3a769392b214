"""Tool-call parsers: the model's text → OpenAI `tool_calls`, whole or streamed.

One parser per output format behind a small registry, as vLLM's `--tool-call-parser`:
`hermes` (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, what Hermes, Qwen and
many chat templates ask for) and `json` (the whole answer is a JSON call or a list of them,
what a `tool_choice` of `required` or a named function constrains the output to).
"""

from serving.api.tool_parsers.base import (
    ContentDelta,
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from serving.api.tool_parsers.hermes import HermesToolParser
from serving.api.tool_parsers.json_calls import JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "json": JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """A fresh parser (they keep per-request streaming state); ValueError for an unknown
    name, listing the known ones."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}"
        ) from None


__all__ = [
    "TOOL_PARSERS",
    "ContentDelta",
    "HermesToolParser",
    "JsonToolParser",
    "ParsedOutput",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "get_tool_parser",
]
