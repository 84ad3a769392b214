"""A request's structured-output fields → `StructuredSpec`, or a 400 naming the field.

    response_format      OpenAI: {"type": "json_object"} | {"type": "json_schema",
                         "json_schema": {"name", "schema", "strict"}} | {"type": "text"}
    structured_outputs   vLLM: {"json" | "regex" | "choice" | "grammar" | "json_object"}
    guided_json, guided_regex, guided_choice, guided_grammar
                         vLLM's older names for the same (still sent by older clients)

The spec is checked here without a tokenizer (`serving.structured.request`); what only the
grammar engine can refuse is refused by `compile_check` (the ingress's grammar cache), so a
schema the engine cannot take is a 400 too, before anything is routed.
"""

from __future__ import annotations

from collections.abc import Callable

from serving.api.errors import BadRequest
from serving.api.protocol import CompletionRequest
from serving.structured.request import InvalidStructuredOutput, spec_from_request
from serving.structured.spec import StructuredSpec

OpenAIRequest = CompletionRequest  # the chat request shares the fields (`_SamplingFields`)
CompileCheck = Callable[[StructuredSpec], object]

_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_spec(req: OpenAIRequest) -> StructuredSpec | None:
    """The request's output constraint, or None; raises `BadRequest` (400)."""
    structured = req.structured_outputs
    guided = {v: getattr(req, k) for k, v in _GUIDED.items() if getattr(req, k) is not None}
    if guided:
        if structured is not None:
            raise BadRequest(
                f"set either `structured_outputs` or `{next(iter(_field_of(guided)))}`, not both",
                param="structured_outputs",
            )
        structured = guided
    param = "response_format" if req.response_format is not None else "structured_outputs"
    try:
        return spec_from_request(req.response_format, structured)
    except InvalidStructuredOutput as e:
        message = str(e)
        if guided:  # the error names the field the client sent
            param = _field_of(guided)[0]
            message = message.replace(f"structured_outputs.{_GUIDED[param]}", param)
        if not message.startswith(("response_format", "structured_outputs", "set either")):
            message = f"{param}: {message}"  # the grammar engine's own words
        raise BadRequest(message, param=param) from None


def check_compiles(spec: StructuredSpec, compile_check: CompileCheck | None, param: str) -> None:
    """A 400 naming `param` when the grammar engine refuses `spec`."""
    if compile_check is None:
        return
    try:
        compile_check(spec)
    except InvalidStructuredOutput as e:
        raise BadRequest(f"{param}: {e}", param=param) from None


def _field_of(guided: dict) -> list[str]:
    back = {v: k for k, v in _GUIDED.items()}
    return [back[k] for k in guided]
