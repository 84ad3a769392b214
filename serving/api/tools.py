"""Tool calling, request side (pure): `tool_choice` → what the grammar enforces and how the
answer is read; the conversation (tools, assistant `tool_calls`, `tool` results) as the
chat template receives it.

    tool_choice   enforced by                             answer read by
    none          nothing (the tools still reach the      nothing: plain text
                  template, as vLLM does)
    auto          nothing                                 --tool-call-parser (hermes default)
    required      JSON schema: a list of >= 1 calls        the json parser
                  [{"name": one of the tools, "parameters": that tool's schema}]
    {function}    JSON schema: that function's parameters  the text is the arguments

as vLLM does. Finish reason `tool_calls` for auto (when it called one) and required;
a named function's answer finishes with `stop`, as OpenAI's does.

A chat template that never mentions `tools` (SmolLM2's, the default model's) would drop
them silently and the model could never call one: the tools then go into the system
message in the Hermes format the hermes parser reads (Qwen2.5's and Hermes' own wording),
and the history's calls and results into the message text in the same format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from serving.api.errors import BadRequest
from serving.api.protocol import ChatCompletionRequest, ChatMessage, ToolDefinition
from serving.structured.spec import StructuredSpec

ToolChoiceMode = Literal["none", "auto", "required", "named"]
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request uses its tools."""

    mode: ToolChoiceMode
    tools: tuple[dict[str, Any], ...]  # OpenAI's shape, as the template receives them
    function: str | None = None  # the named function
    parser: str = "hermes"  # mode auto: the parser of the model's text
    parallel: bool = True

    def spec(self) -> StructuredSpec | None:
        """The grammar of required and named choices; None for none and auto."""
        if self.mode == "named":
            return StructuredSpec.json_schema(self._parameters(self.function))
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t["function"]["name"]]},
                        "parameters": self._parameters(t["function"]["name"]),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            schema: dict[str, Any] = {
                "type": "array",
                "minItems": 1,
                "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            }
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredSpec.json_schema(schema)
        return None

    def _parameters(self, name: str | None) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or _EMPTY_PARAMETERS
        raise AssertionError(f"no tool {name!r}")  # checked in tool_plan


def tool_plan(
    req: ChatCompletionRequest, parser: str, enable_auto: bool = True
) -> ToolPlan | None:
    """The request's plan, or None without tools; a 400 for a choice that cannot be met."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise BadRequest("`tool_choice` needs `tools`", param="tool_choice")
        return None
    tools = tuple(_as_template_tool(t) for t in req.tools)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise BadRequest("`tools`: function names must be unique", param="tools")
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        if not enable_auto:
            raise BadRequest(
                '"auto" tool choice needs the server started with tool_calling.'
                "enable_auto_tool_choice (inferos serve --enable-auto-tool-choice); send "
                '`tool_choice` "required", "none" or a named function',
                param="tool_choice",
            )
        return ToolPlan("auto", tools, parser=parser, parallel=parallel)
    if choice == "none":
        return ToolPlan("none", tools)
    if choice == "required":
        return ToolPlan("required", tools, parallel=parallel)
    if choice.function.name not in names:
        raise BadRequest(
            f"`tool_choice` names function {choice.function.name[:64]!r}, which is not "
            f"among `tools` ({', '.join(names)})",
            param="tool_choice",
        )
    return ToolPlan("named", tools, function=choice.function.name)


def _as_template_tool(tool: ToolDefinition) -> dict[str, Any]:
    return {"type": "function", "function": tool.function.model_dump(exclude_none=True)}


def as_template_tools(tools: list[ToolDefinition] | None) -> tuple[dict[str, Any], ...] | None:
    return tuple(_as_template_tool(t) for t in tools) if tools else None


# --- the conversation as the template sees it --------------------------------------------

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_knows(tokenizer: Any, word: str) -> bool:
    """Whether the tokenizer's chat template reads `word` (e.g. `tools`, `tool_calls`)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = " ".join(template.values())
    return isinstance(template, str) and word in template


def conversation(
    messages: list[ChatMessage], tools: tuple[dict[str, Any], ...] | None, tokenizer: Any
) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: role and text content, plus an
    assistant's `tool_calls` (arguments as objects, as Hugging Face templates expect and
    vLLM passes them) and a tool result's `tool_call_id` and `name`. For a template that
    knows no tools, they are written into the text in the Hermes format instead."""
    native = template_knows(tokenizer, "tool_calls")
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
            if native:
                entry["tool_calls"] = calls
            else:
                entry["content"] = _with_hermes_calls(entry["content"], calls)
        if m.role == "tool" and not native:
            entry["content"] = f"<tool_response>\n{entry['content']}\n</tool_response>"
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    if tools and not template_knows(tokenizer, "tools"):
        out = _with_tools_prompt(out, tools)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # as sent: the template shows it as it is


def _with_hermes_calls(content: str, calls: list[dict[str, Any]]) -> str:
    parts = [content] if content else []
    for c in calls:
        body = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        parts.append(f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>")
    return "\n".join(parts)


def _with_tools_prompt(
    messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...]
) -> list[dict[str, Any]]:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    prompt = TOOLS_PROMPT.format(tools=listed)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{prompt}" if first["content"] else prompt
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
