"""Incremental detokenization and stop-string matching for one output stream.

Decoding token by token breaks multi-byte characters and merged spaces; like vLLM we
decode a small window (`prefix_offset`..end) and emit only the text past `read_offset`,
holding back text while it ends in an incomplete character.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop: bool = False,  # vLLM's include_stop_str_in_output
    ):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:])  # context for the first tokens' spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""  # everything emitted so far
        self._held = ""  # text not yet emitted because it may be the start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that may be sent to the client now."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return self._release("")
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(new)

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
