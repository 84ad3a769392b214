"""OpenAI-shaped logprobs for one response, streamed or whole (pure: no Ray, no HTTP).

Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`, where `top_logprobs`
maps token strings to logprobs (the sampled token included, as OpenAI's legacy API and
vLLM give it) and `text_offset` is each token's start in the response text; with `echo`
the prompt's tokens come first, the first with null logprobs.

A token's string is the token decoded alone, as vLLM renders it (a token holding part of
a multi-byte character shows U+FFFD); `bytes` are that string's UTF-8.
"""

from __future__ import annotations

from typing import Any

from serving.engine.logprobs import TokenLogprobs


class LogprobsRenderer:
    def __init__(self, tokenizer: Any, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self._strings: dict[int, str] = {}
        self._entries: list[tuple[int, TokenLogprobs | None]] = []  # not taken yet
        self._text_offset = 0  # completions: where the next token starts

    def fresh(self) -> LogprobsRenderer:
        """A renderer for another choice of the same request (the strings cache is shared)."""
        other = LogprobsRenderer(self.tokenizer, self.chat)
        other._strings = self._strings
        return other

    def token_string(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            s = self._strings[token_id] = self.tokenizer.convert_tokens_to_string([token])
        return s

    def add(self, token_ids: list[int], logprobs: list[TokenLogprobs | None]) -> None:
        # not strict: a backend that gives no prompt logprobs sends [None] for the prompt
        self._entries.extend(zip(token_ids, logprobs, strict=False))

    def take(self) -> dict | None:
        """What was added since the last call, OpenAI-shaped (None if nothing was)."""
        entries, self._entries = self._entries, []
        if not entries:
            return None
        return self._chat(entries) if self.chat else self._completion(entries)

    def _chat(self, entries: list[tuple[int, TokenLogprobs | None]]) -> dict:
        content = []
        for token_id, lp in entries:
            assert lp is not None  # chat never echoes the prompt
            item = self._chat_item(token_id, lp.logprob)
            item["top_logprobs"] = [self._chat_item(t, v) for t, v in lp.top]
            content.append(item)
        return {"content": content}

    def _chat_item(self, token_id: int, logprob: float) -> dict:
        s = self.token_string(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def _completion(self, entries: list[tuple[int, TokenLogprobs | None]]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        out["text_offset"] = []
        for token_id, lp in entries:
            s = self.token_string(token_id)
            out["tokens"].append(s)
            out["text_offset"].append(self._text_offset)
            self._text_offset += len(s)
            if lp is None:  # the first prompt token
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp.logprob)
            top = {self.token_string(t): v for t, v in lp.top}
            top.setdefault(s, lp.logprob)
            out["top_logprobs"].append(top)
        return out
