"""The request side of sampling controls and logprobs, without servers: validation of
`logit_bias`, `bad_words`, `top_logprobs` / `logprobs`; what reaches the engine; the OpenAI
shapes of logprobs; `include_stop_str_in_output`; `echo`."""

from __future__ import annotations

import math

import pytest

from serving.api.detokenizer import IncrementalDetokenizer
from serving.api.errors import BadRequest
from serving.api.logprobs import LogprobsRenderer
from serving.api.prepare import ModelInfo, prepare
from serving.engine.logprobs import TokenLogprobs

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time"}


@pytest.fixture(scope="module")
def model(tokenizer, model_folder) -> ModelInfo:
    return ModelInfo.of(MODEL, 2048, tokenizer, model_folder)


def _refused(body: dict, chat: bool, tokenizer, model, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        prepare(body, chat, tokenizer, model)
    assert e.value.http_status == 400 and e.value.param == param, e.value.message


def test_sampling_controls_reach_the_engine(tokenizer, model) -> None:
    body = CHAT | {
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "repetition_penalty": 1.3,
        "min_p": 0.1,
        "logit_bias": {"15": 250, "16": -3.5, "17": -1000},
        "include_stop_str_in_output": True,
    }
    p = prepare(body, True, tokenizer, model).params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.25, 1.3)
    assert p.min_p == 0.1 and p.include_stop_str_in_output
    assert p.logit_bias == ((15, 100.0), (16, -3.5), (17, -100.0))  # clamped to ±100
    assert p.logprobs is None and p.prompt_logprobs is None
    plain = prepare(CHAT, True, tokenizer, model).params
    assert not plain.adjusts_logits and plain.min_p == 0.0


def test_bad_logit_bias_and_penalties_are_400s(tokenizer, model) -> None:
    vocab = model.vocab_size
    for bias in ({str(vocab): 1}, {"-1": 1}, {"hello": 1}):
        _refused(CHAT | {"logit_bias": bias}, True, tokenizer, model, "logit_bias")
    _refused(CHAT | {"presence_penalty": 2.5}, True, tokenizer, model, "presence_penalty")
    _refused(CHAT | {"repetition_penalty": 0}, True, tokenizer, model, "repetition_penalty")
    _refused(CHAT | {"min_p": 1.5}, True, tokenizer, model, "min_p")


def test_bad_words_as_written_and_mid_sentence(tokenizer, model) -> None:
    p = prepare(COMPLETION | {"bad_words": ["dragon", " castle"]}, False, tokenizer, model)
    # vLLM's rule: the spaced form only where it has as many tokens as the word alone
    # ("dragon" is 2 tokens, " dragon" 1: not added; "castle" and " castle" 1 each)
    assert p.params.bad_words_ids == tuple(
        tuple(tokenizer.encode(w)) for w in ("dragon", "castle", " castle")
    )


def test_logprobs_fields(tokenizer, model) -> None:
    p = prepare(CHAT | {"logprobs": True, "top_logprobs": 3}, True, tokenizer, model)
    assert p.params.logprobs == 3 and p.logprobs is not None
    assert prepare(CHAT | {"logprobs": True}, True, tokenizer, model).params.logprobs == 0
    _refused(CHAT | {"top_logprobs": 2}, True, tokenizer, model, "top_logprobs")
    _refused(CHAT | {"logprobs": True, "top_logprobs": 21}, True, tokenizer, model, "top_logprobs")
    p = prepare(COMPLETION | {"logprobs": 5, "echo": True}, False, tokenizer, model)
    assert p.params.logprobs == 5 and p.params.prompt_logprobs == 5
    assert p.echo_text == COMPLETION["prompt"]
    p = prepare(COMPLETION | {"echo": True}, False, tokenizer, model)
    assert p.logprobs is None and p.params.prompt_logprobs is None and p.echo_text
    ids = tokenizer.encode("Hello world")
    p = prepare(COMPLETION | {"prompt": ids, "echo": True}, False, tokenizer, model)
    assert p.echo_text == "Hello world"
    _refused(COMPLETION | {"logprobs": 21}, False, tokenizer, model, "logprobs")
    _refused(CHAT | {"echo": True}, True, tokenizer, model, "echo")
    _refused(COMPLETION | {"prompt_logprobs": 1}, False, tokenizer, model, "prompt_logprobs")


def _lp(token: int, logprob: float, *top: tuple[int, float]) -> TokenLogprobs:
    return TokenLogprobs(token, logprob, tuple(top))


def test_chat_logprobs_shape(tokenizer) -> None:
    r = LogprobsRenderer(tokenizer, chat=True)
    hello, world = tokenizer.encode("Hello world")
    r.add([hello], [_lp(hello, -0.5, (hello, -0.5), (world, -1.5))])
    out = r.take()
    assert out == {
        "content": [
            {
                "token": "Hello",
                "logprob": -0.5,
                "bytes": list(b"Hello"),
                "top_logprobs": [
                    {"token": "Hello", "logprob": -0.5, "bytes": list(b"Hello")},
                    {"token": " world", "logprob": -1.5, "bytes": list(b" world")},
                ],
            }
        ]
    }
    assert r.take() is None  # taken


def test_completion_logprobs_shape_with_echo(tokenizer) -> None:
    r = LogprobsRenderer(tokenizer, chat=False)
    once, upon = tokenizer.encode("Once upon")
    r.add([once, upon], [None, _lp(upon, -2.0, (once, -1.0))])
    first = r.take()
    assert first == {
        "tokens": ["Once", " upon"],
        "token_logprobs": [None, -2.0],
        "top_logprobs": [None, {"Once": -1.0, " upon": -2.0}],  # the sampled token too
        "text_offset": [0, 4],
    }
    r.add([once], [_lp(once, -0.1)])
    assert r.take()["text_offset"] == [9]  # continues across chunks
    assert not math.isnan(first["token_logprobs"][1])


def test_include_stop_str_in_output(tokenizer) -> None:
    ids = tokenizer.encode("The answer is forty-two, really.")
    cut = IncrementalDetokenizer(tokenizer, [], stop=("forty-two",))
    kept = IncrementalDetokenizer(tokenizer, [], stop=("forty-two",), include_stop=True)
    assert cut.add(ids) + cut.flush() == "The answer is "
    assert kept.add(ids) + kept.flush() == "The answer is forty-two"
