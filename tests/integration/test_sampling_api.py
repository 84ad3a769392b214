"""Logprobs and sampling controls on the real app (disaggregated: the prefill replica's
first token and prompt logprobs travel through the prefill result; fp32), with the
official `openai` client: logprobs equal a log-softmax of transformers' logits (1e-4) and
greedy tokens are their top-1, chat and completions, streaming and not, `echo`; each
penalty, `logit_bias`, `bad_words`, `min_p` and `include_stop_str_in_output` changes a
greedy answer the way it should."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.models.pull import ensure_default_model
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

TOL = 1e-4
STORY = [{"role": "user", "content": "Write a short poem about the sea."}]
PROMPT = "The capital of France is Paris. The capital of Germany is"


class Reference:
    """transformers' fp32 model on the default model's folder."""

    def __init__(self, tok=None, model=None) -> None:
        folder = ensure_default_model(progress=False)
        self.tok = tok or AutoTokenizer.from_pretrained(folder)
        self.model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok.encode(text, add_special_tokens=False)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
        return out[0, len(ids) :].tolist()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """`[len(ids), vocab]`: row p is the distribution of token p + 1."""
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)

    def string(self, token_id: int) -> str:
        return self.tok.convert_tokens_to_string([self.tok.convert_ids_to_tokens(token_id)])


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


def check_chat_logprobs(app, ref: Reference, n: int = 8, top: int = 3) -> None:
    """Chat, streaming and not: each token's logprob and top list against transformers."""
    prompt = ref.chat_ids(STORY)
    gen = ref.greedy(prompt, n)
    lp = ref.logprobs(prompt + gen)
    kw = dict(model=MODEL, messages=STORY, max_tokens=n, temperature=0, logprobs=True)
    client = app.client()
    resp = client.chat.completions.create(**kw, top_logprobs=top)
    content = resp.choices[0].logprobs.content
    stream = client.chat.completions.create(**kw, top_logprobs=top, stream=True)
    streamed = [
        c
        for ch in stream
        if ch.choices and ch.choices[0].logprobs
        for c in ch.choices[0].logprobs.content
    ]
    assert len(content) == len(streamed) == len(gen) == n
    for i, (item, s_item, token) in enumerate(zip(content, streamed, gen, strict=True)):
        row = lp[len(prompt) - 1 + i]
        assert item.token == ref.string(token) == s_item.token
        assert item.bytes == list(item.token.encode())
        assert abs(item.logprob - float(row[token])) < TOL
        assert abs(s_item.logprob - item.logprob) < TOL
        best = torch.topk(row, top)
        assert [t.token for t in item.top_logprobs] == [
            ref.string(t) for t in best.indices.tolist()
        ]
        for t, v in zip(item.top_logprobs, best.values.tolist(), strict=True):
            assert abs(t.logprob - v) < TOL
        assert item.top_logprobs[0].token == item.token  # greedy: the top-1
    assert resp.choices[0].message.content == "".join(c.token for c in content)


def check_completion_echo_logprobs(app, ref: Reference, stream: bool, n: int = 6) -> None:
    prompt = ref.tok.encode(PROMPT)
    gen = ref.greedy(prompt, n)
    lp = ref.logprobs(prompt + gen)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=5, echo=True)
    client = app.client()
    if stream:
        tokens, token_lps, tops, offsets, text = [], [], [], [], ""
        for ch in client.completions.create(**kw, stream=True):
            if not ch.choices:
                continue
            text += ch.choices[0].text
            if ch.choices[0].logprobs:
                tokens += ch.choices[0].logprobs.tokens
                token_lps += ch.choices[0].logprobs.token_logprobs
                tops += ch.choices[0].logprobs.top_logprobs
                offsets += ch.choices[0].logprobs.text_offset
    else:
        choice = client.completions.create(**kw).choices[0]
        text, lps = choice.text, choice.logprobs
        tokens, token_lps, tops, offsets = (
            lps.tokens,
            lps.token_logprobs,
            lps.top_logprobs,
            lps.text_offset,
        )
    ids = prompt + gen
    assert tokens == [ref.string(t) for t in ids]
    assert text == ref.tok.decode(prompt) + ref.tok.decode(gen)
    assert token_lps[0] is None and tops[0] is None  # nothing precedes the first token
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for i in range(1, len(ids)):
        assert abs(token_lps[i] - float(lp[i - 1, ids[i]])) < TOL, i
        best = torch.topk(lp[i - 1], 5)
        pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
        expected = {ref.string(t): v for t, v in pairs}
        assert set(expected) <= set(tops[i]) and len(tops[i]) <= 6
        for key, value in expected.items():
            assert abs(tops[i][key] - value) < TOL
        if i >= len(prompt):  # generated: greedy is the top-1
            assert tokens[i] == max(tops[i], key=tops[i].get)


def test_chat_logprobs_equal_transformers(app, ref) -> None:
    check_chat_logprobs(app, ref)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_logprobs_equal_transformers(app, ref, stream: bool) -> None:
    check_completion_echo_logprobs(app, ref, stream)


# --------------------------------------------------------------------------- controls


def _chat_tokens(app, max_tokens: int = 40, **kw) -> list[str]:
    """A greedy chat answer's tokens (as strings, from its logprobs)."""
    resp = app.client().chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=max_tokens, temperature=0, logprobs=True, **kw
    )
    return [c.token for c in resp.choices[0].logprobs.content]


def _repeats(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


def test_penalties_reduce_repetition(app) -> None:
    plain = _chat_tokens(app)
    assert _repeats(plain) > 5, plain  # a poem repeats itself: room to improve
    for kw in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 1.8}},
    ):
        tokens = _chat_tokens(app, **kw)
        assert _repeats(tokens) < _repeats(plain), (kw, tokens)


def test_logit_bias_and_bad_words_steer_the_first_token(app, ref) -> None:
    prompt = ref.chat_ids(STORY)
    first = ref.greedy(prompt, 1)[0]
    assert _chat_tokens(app, 1)[0] == ref.string(first)
    assert _chat_tokens(app, 1, logit_bias={str(first): -100})[0] != ref.string(first)
    forced = ref.tok.encode(" banana")[0]
    assert _chat_tokens(app, 3, logit_bias={str(forced): 100}) == [ref.string(forced)] * 3
    word = ref.string(first).strip()
    banned = _chat_tokens(app, 1, extra_body={"bad_words": [word]})
    assert banned[0] != ref.string(first)


def test_min_p_one_is_greedy(app) -> None:
    greedy = _chat_tokens(app, 12)
    resp = app.client().chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=12, temperature=1.5, seed=3, logprobs=True,
        extra_body={"min_p": 1.0},
    )  # fmt: skip
    assert [c.token for c in resp.choices[0].logprobs.content] == greedy


def test_include_stop_str_in_output(app) -> None:
    client = app.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text.strip().split()[0]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    cut = client.completions.create(**kw).choices[0]
    kept = client.completions.create(**kw, extra_body={"include_stop_str_in_output": True}).choices[
        0
    ]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert not cut.text.endswith(stop) and kept.text == cut.text + stop
