"""Incremental detokenization and stop-string matching for one output stream.

Decoding token by token breaks multi-byte characters and merged spaces; `tokenizers`'
`DecodeStream` (what vLLM uses for fast tokenizers) keeps the state for that: it returns
text once the tokens so far decode to whole characters, with the spacing the tokens before
them (the prompt's last few, to start) imply.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT_TOKENS = 6  # of the prompt, for the first output tokens' spacing


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,  # a Hugging Face fast tokenizer
        prompt_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop: bool = False,  # vLLM's include_stop_str_in_output
    ):
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
        self._backend = backend
        self._stream = DecodeStream(
            ids=list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]), skip_special_tokens=True
        )
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""  # everything emitted so far
        self._held = ""  # text not yet emitted because it may be the start of a stop string
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that may be sent to the client now."""
        if self.stopped or not token_ids:
            return ""
        return self._release(self._stream.step(self._backend, list(token_ids)) or "")

    def _release(self, new: str) -> str:
        pending = self._held + new
        if not self.stop:
            self.text += pending
            return pending
        hits = [(i, -len(s)) for s in self.stop if (i := pending.find(s)) != -1]
        if hits:  # cut at the earliest stop string (the longest of those starting there)
            idx, minus_len = min(hits)
            end = idx - minus_len if self.include_stop else idx
            self.stopped = True
            self._held = ""
            self.text += pending[:end]
            return pending[:end]
        # hold back the longest tail that could still grow into a stop string
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self._held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of the stream: release any held-back text."""
        out, self._held = ("" if self.stopped else self._held), ""
        self.text += out
        return out
