"""vLLM's /tokenize and /detokenize, in its request and response shapes (pure: no Ray).

    POST /tokenize   {"model"?, "prompt", "add_special_tokens": true, "return_token_strs"?}
                  or {"model"?, "messages", "tools"?, "add_generation_prompt": true,
                      "add_special_tokens": false, "return_token_strs"?}
                  -> {"count", "max_model_len", "tokens", "token_strs": [...] | null}
    POST /detokenize {"model"?, "tokens"} -> {"prompt"}

Messages go through the template and encoding chat completions use (`render_chat`), so
`count` is the `usage.prompt_tokens` a chat request with those messages reports. The model
may be left out, as vLLM allows; named, it must be the served one (404).
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import BadRequest
from serving.api.prepare import (
    ModelInfo,
    Tokenizer,
    check_model,
    check_token_ids,
    parse_as,
    render_chat,
)
from serving.api.protocol import ChatMessage, ToolDefinition
from serving.api.tools import as_template_tools
from serving.api.unsupported import Api, check_unsupported


class Codec(Tokenizer, Protocol):
    """The part of a Hugging Face tokenizer that these endpoints use."""

    def decode(self, token_ids: list[int]) -> str: ...
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


class _TokenizeFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as vLLM does

    model: str | None = None
    return_token_strs: bool | None = False


class TokenizeCompletionRequest(_TokenizeFields):
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_TokenizeFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None  # rendered as a chat request's are
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template places the special tokens


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def tokenize(body: dict, tokenizer: Codec, model: ModelInfo) -> dict:
    """The token ids of a prompt or of a conversation; raises a 4xx `ServeError`."""
    req: TokenizeChatRequest | TokenizeCompletionRequest
    if "messages" in body:
        if "prompt" in body:
            raise BadRequest("send either `prompt` or `messages`, not both", param="prompt")
        req = parse_as(TokenizeChatRequest, body)
        check_model(req.model, model)
        check_unsupported(body, Api.TOKENIZE_CHAT)
        ids = render_chat(
            req.messages,
            tokenizer,
            req.add_generation_prompt,
            req.add_special_tokens,
            as_template_tools(req.tools),
        )
    else:
        req = parse_as(TokenizeCompletionRequest, body)
        check_model(req.model, model)
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {
        "count": len(ids),
        "max_model_len": model.max_model_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None,
    }


def detokenize(body: dict, tokenizer: Codec, model: ModelInfo) -> dict:
    """The text of token ids, special tokens included (vLLM's `decode` defaults), so the
    ids of a templated conversation come back as the template's text."""
    req = parse_as(DetokenizeRequest, body)
    check_model(req.model, model)
    check_token_ids(req.tokens, model.vocab_size, "tokens")
    return {"prompt": tokenizer.decode(req.tokens)}
