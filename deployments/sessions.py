"""Which conversation a request belongs to, for routing affinity across turns.

As Ray Serve LLM does: the `X-Session-Id` header wins, then the OpenAI `user` field; else a
hash of what every turn of a conversation starts with (its first messages for chat, the
first tokens for completions), so a client that sends neither still gets affinity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

from serving.api.limits import bounded_id

SESSION_HEADER = "x-session-id"
PREFIX_TOKENS = 64  # completions: tokens of the prompt that identify its conversation
FIRST_MESSAGES = 2  # chat: a system prompt and the first user message


class _Prepared(Protocol):
    user: str | None
    conversation_start: str


def conversation_start(req: Any, prompt_ids: list[int]) -> str:
    """A stable digest of the start of the conversation `req` continues."""
    messages = getattr(req, "messages", None)
    if messages:
        head = [(m.role, m.text()) for m in messages[:FIRST_MESSAGES]]
        data = json.dumps(head, ensure_ascii=False)
    else:
        data = json.dumps(prompt_ids[:PREFIX_TOKENS])
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def session_id(headers: Mapping[str, str], prepared: _Prepared) -> str:
    """Bounded in length whatever the client sends (`bounded_id`): the scheduler keeps up to
    `MAX_SESSIONS` of them, so their size bounds its memory."""
    explicit = headers.get(SESSION_HEADER)
    if explicit:
        return f"h:{bounded_id(explicit)}"
    if prepared.user:
        return f"u:{bounded_id(prepared.user)}"
    return f"p:{prepared.conversation_start}"
