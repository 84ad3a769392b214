"""What a request's settings do to its logits before a token is drawn, for a whole batch
of rows at once (in place): min_tokens' stop ban, `logit_bias`, `bad_words`, and the
repetition, frequency and presence penalties, in vLLM v1's order and semantics.

A row is one position to sample: the next one of a sequence after its tokens plus
`extra` ones. A plain step has one row per sequence; a speculative step scores k+1 rows
per sequence, row j after the first j drafted tokens, which count as output there (a
penalty or a bad word sees them as the plain sampler would once they are accepted).

Structured output's grammar masks come first (`serving.structured.engine_grammar`), as
in vLLM, where the grammar bitmask is applied before the sampler's processors; a forbidden
token stays -inf whatever comes after.

Rows whose request adjusts nothing cost nothing: each processor first selects the rows
that use it and returns at once when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.engine.sequence import Sequence
from serving.structured.engine_grammar import mask_rows


@dataclass(frozen=True, slots=True)
class Row:
    seq: Sequence
    extra: tuple[int, ...] = ()  # drafted tokens before this position (speculation)

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)

    def output_ids(self) -> list[int]:
        return self.seq.output_token_ids + list(self.extra)


def speculative_rows(seq: Sequence, draft: list[int]) -> list[Row]:
    """The k+1 rows a speculative step scores for `seq`: row j after draft[:j]."""
    return [Row(seq, tuple(draft[:j])) for j in range(len(draft) + 1)]


def process(logits: torch.Tensor, rows: list[Row], eos_ids: tuple[int, ...]) -> None:
    """`logits [len(rows), vocab]`, in place: every request-dependent adjustment."""
    mask_rows(logits, rows)  # structured output's grammar masks (nothing when none is)
    ban_stops(logits, rows, eos_ids)
    if not any(r.seq.params.adjusts_logits for r in rows):
        return  # the fast path: no penalty, bias or bad word anywhere in the batch
    apply_logit_bias(logits, rows)
    ban_bad_words(logits, rows)
    apply_penalties(logits, rows)


def _set(logits: torch.Tensor, cells: list[tuple[int, int]], value: float) -> None:
    if cells:
        r, t = zip(*cells, strict=True)
        logits[torch.tensor(r), torch.tensor(t)] = value


def ban_stops(logits: torch.Tensor, rows: list[Row], eos_ids: tuple[int, ...]) -> None:
    """Below `min_tokens`, EOS and stop tokens may not be sampled. With 2 outputs and
    min_tokens 4, a speculative step's rows 0 and 1 are banned and row 2 is not."""
    cells = []
    for i, row in enumerate(rows):
        p = row.seq.params
        if row.num_output_tokens < p.min_tokens:
            cells.extend((i, t) for t in set(eos_ids) | set(p.stop_token_ids))
    _set(logits, cells, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, rows: list[Row]) -> None:
    cells = [(i, t, b) for i, r in enumerate(rows) for t, b in r.seq.params.logit_bias]
    if cells:
        r, t, b = zip(*cells, strict=True)
        logits.index_put_((torch.tensor(r), torch.tensor(t)), torch.tensor(b), accumulate=True)


def ban_bad_words(logits: torch.Tensor, rows: list[Row]) -> None:
    """vLLM's rule: a word's last token is banned where the output ends with the rest."""
    cells = []
    for i, row in enumerate(rows):
        words = row.seq.params.bad_words_ids
        if not words:
            continue
        out = row.output_ids()
        for word in words:
            prefix = list(word[:-1])
            if len(prefix) <= len(out) and (not prefix or out[-len(prefix) :] == prefix):
                cells.append((i, word[-1]))
    _set(logits, cells, float("-inf"))


def _counts(ids: list[list[int]], vocab: int) -> torch.Tensor:
    """`[len(ids), vocab]` occurrences of each token id per list (one scatter)."""
    width = max(1, max(len(x) for x in ids))
    padded = torch.tensor([x + [vocab] * (width - len(x)) for x in ids], dtype=torch.long)
    counts = torch.zeros(len(ids), vocab + 1)
    counts.scatter_add_(1, padded, torch.ones(padded.shape))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> None:
    """vLLM's: repetition over prompt and output tokens (positive logits divided by the
    penalty, negative multiplied), then frequency (x occurrences) and presence (x seen)
    over the output tokens, subtracted."""
    sel = [i for i, r in enumerate(rows) if r.seq.params.has_penalties]
    if not sel:
        return
    vocab = logits.shape[1]
    params = [rows[i].seq.params for i in sel]
    index = torch.tensor(sel)
    sub = logits[index]  # [len(sel), vocab]
    output_counts = _counts([rows[i].output_ids() for i in sel], vocab)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = _counts([rows[i].seq.prompt_token_ids for i in sel], vocab)
        seen = (output_counts > 0) | (prompt_counts > 0)
        rep = torch.tensor([p.repetition_penalty for p in params])[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([p.frequency_penalty for p in params])[:, None]
    pres = torch.tensor([p.presence_penalty for p in params])[:, None]
    sub = sub - freq * output_counts - pres * (output_counts > 0).float()
    logits[index] = sub
