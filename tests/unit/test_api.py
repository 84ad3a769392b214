"""API layer without servers: incremental detokenization and stop strings, request
validation, response shapes, merged Prometheus expositions, and InferosConfig."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from serving.api.detokenizer import IncrementalDetokenizer
from serving.api.errors import BadRequest
from serving.api.protocol import ChatCompletionRequest, CompletionRequest
from serving.api.responses import SSE_DONE, ResponseBuilder, Usage
from serving.api.unsupported import Api, check_unsupported
from serving.config import InferosConfig
from serving.engine.engine import EngineConfig
from serving.metrics import EngineMetrics, FrontendMetrics, merge_expositions

UNICODE_TEXT = "Café naïve — 東京タワー 🚀🎉 façade ünïcödé 😀 emoji 👩‍💻! Done."


# --------------------------------------------------------------------------- detokenizer


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add([i]) for i in ids]


def test_streamed_text_equals_full_decode_for_multibyte_text(tokenizer) -> None:
    ids = tokenizer(UNICODE_TEXT)["input_ids"]
    # premise: some characters really are split across several tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    prompt = tokenizer("Say something:")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    chunks = _stream(detok, ids)
    assert not any("\ufffd" in c for c in chunks)  # never a broken character
    chunks.append(detok.flush())
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == UNICODE_TEXT
    assert "".join(chunks) == expected
    assert detok.text == expected


def test_special_tokens_are_skipped(tokenizer) -> None:
    ids = tokenizer("Hello there")["input_ids"] + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(_stream(detok, ids)) + detok.flush()
    assert text == "Hello there"


def test_stop_string_split_across_tokens_cuts_exactly_before_it(tokenizer) -> None:
    text = "The answer is forty-two, and then some more words follow here."
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert " forty" in pieces and "-" in pieces and "two" in pieces  # premise: a split stop
    detok = IncrementalDetokenizer(tokenizer, [], stop=("forty-two",))
    chunks = _stream(detok, ids)
    assert detok.stopped
    assert "".join(chunks) == "The answer is "
    assert detok.text == "The answer is "
    assert detok.flush() == ""
    assert detok.add(ids[:2]) == ""  # nothing after a stop


def test_stop_string_starting_mid_token(tokenizer) -> None:
    ids = tokenizer("The answer is forty-two.")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=("nswer i",))
    assert "".join(_stream(detok, ids)) == "The a"
    assert detok.stopped


def test_stop_string_of_multibyte_characters(tokenizer) -> None:
    ids = tokenizer(UNICODE_TEXT)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=("タワ",))
    assert "".join(_stream(detok, ids)) == "Café naïve — 東京"


def test_held_back_text_is_released_by_flush(tokenizer) -> None:
    ids = tokenizer("The answer is forty")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=("forty-two", "Zebra"))
    streamed = "".join(_stream(detok, ids))
    assert streamed == "The answer is "  # " forty" might still become "forty-two"
    assert not detok.stopped
    assert detok.flush() == "forty"
    assert detok.text == "The answer is forty"
    assert detok.flush() == ""


def test_held_text_is_released_once_it_cannot_become_a_stop(tokenizer) -> None:
    ids = tokenizer("The answer is forty-one and more")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=("forty-two",))
    chunks = _stream(detok, ids)
    assert not detok.stopped
    assert "".join(chunks) + detok.flush() == "The answer is forty-one and more"
    assert "forty-one" in "".join(chunks)  # released as soon as "-o" ruled the stop out


def test_output_never_contains_a_stop_string_when_one_token_holds_two(tokenizer) -> None:
    """'),' is one token: with stops (',', ')') the text must end before the ')'.

    BUG: `_release` cuts at the first stop *in list order* that occurs in the pending text,
    not at the earliest occurrence, so ',' wins and 'f(x)' (containing the stop ')') is sent.
    """
    ids = tokenizer("f(x), g(y)")["input_ids"]
    assert ")," in [tokenizer.decode([i]) for i in ids]  # premise
    detok = IncrementalDetokenizer(tokenizer, [], stop=(",", ")"))
    text = "".join(_stream(detok, ids))
    assert detok.stopped
    assert text == "f(x"


# --------------------------------------------------------------------------- protocol


def test_completion_request_validation() -> None:
    body = {"model": "m", "prompt": "hi", "temperature": 0.5, "unknown_field": 1}
    ok = CompletionRequest.model_validate(body)
    assert ok.temperature == 0.5 and ok.max_tokens == 16
    check_unsupported(body, Api.COMPLETION)  # an unknown field is ignored
    for bad in (
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"max_tokens": 0},
        {"min_tokens": -1},
        {"top_k": -2},
    ):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="hi", **bad)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m")  # no prompt


def test_unsupported_options_are_bad_requests() -> None:
    for field, value in (("best_of", 2), ("suffix", "x"), ("prompt_logprobs", 1)):
        with pytest.raises(BadRequest) as info:
            check_unsupported({"model": "m", "prompt": "hi", field: value}, Api.COMPLETION)
        assert info.value.http_status == 400
        assert info.value.param == field
        body = info.value.body()["error"]
        assert body["type"] == "invalid_request_error" and body["param"] == info.value.param
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "best_of": 2}
    with pytest.raises(BadRequest):
        check_unsupported(chat, Api.CHAT)


def test_stop_lists() -> None:
    four = ["a", "b", "c", "d"]
    assert CompletionRequest(model="m", prompt="p", stop=four).stop_strings() == tuple(four)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="p", stop=[*four, "e"])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], stop=[*four, "e"]
        )
    assert CompletionRequest(model="m", prompt="p", stop="END").stop_strings() == ("END",)
    assert CompletionRequest(model="m", prompt="p", stop=["", "x"]).stop_strings() == ("x",)
    assert CompletionRequest(model="m", prompt="p").stop_strings() == ()


def test_prompt_forms() -> None:
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).single_prompt() == [1, 2, 3]
    assert CompletionRequest(model="m", prompt=["only"]).single_prompt() == "only"
    assert CompletionRequest(model="m", prompt=[[5, 6]]).single_prompt() == [5, 6]
    assert CompletionRequest(model="m", prompt="text").single_prompt() == "text"
    for batched in (["a", "b"], [[1], [2]], []):
        with pytest.raises(BadRequest):
            CompletionRequest(model="m", prompt=batched).single_prompt()
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[1.5, 2])


def test_sampling_params_mapping() -> None:
    req = CompletionRequest(
        model="m",
        prompt="p",
        temperature=0.0,
        top_k=-1,
        top_p=0.9,
        seed=7,
        stop=["x"],
        stop_token_ids=[5, 6],
        ignore_eos=True,
        min_tokens=50,
    )
    p = req.sampling_params(max_tokens=10)
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (10, 0.0, 0, 0.9, 7)
    assert p.stop == ("x",) and p.stop_token_ids == (5, 6) and p.ignore_eos
    assert p.min_tokens == 10  # clipped to max_tokens
    assert p.greedy


def test_chat_request() -> None:
    req = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_tokens=5,
        max_completion_tokens=9,
    )
    assert req.messages[1].text() == "ab"
    assert req.requested_max_tokens() == 9
    assert ChatCompletionRequest(model="m", messages=[{"role": "user"}]).messages[0].text() == ""
    image = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}]
    )
    with pytest.raises(BadRequest):
        image.messages[0].text()
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_p=1.5)
    with pytest.raises(BadRequest):
        check_unsupported(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": True},
            Api.CHAT,
        )


# --------------------------------------------------------------------------- responses


def _parse_sse(chunk: str) -> dict:
    assert chunk.startswith("data: ") and chunk.endswith("\n\n")
    return json.loads(chunk[len("data: ") : -2])


def test_full_responses() -> None:
    usage = Usage(prompt_tokens=7, completion_tokens=3)
    chat = ResponseBuilder("id1", "smol", chat=True, created=123).full("hé 🚀", "stop", usage)
    assert chat["object"] == "chat.completion" and chat["id"] == "id1"
    assert chat["created"] == 123 and chat["model"] == "smol"
    assert chat["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hé 🚀"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

    comp = ResponseBuilder("id2", "smol", chat=False).full("txt", "length", usage)
    assert comp["object"] == "text_completion"
    assert comp["choices"][0]["text"] == "txt"
    assert comp["choices"][0]["finish_reason"] == "length"
    assert "message" not in comp["choices"][0]
    assert comp["usage"]["total_tokens"] == 10


def test_stream_chunks_parse() -> None:
    chat = ResponseBuilder("c", "smol", chat=True, created=1)
    first = _parse_sse(chat.chunk("", role=True))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    mid = _parse_sse(chat.chunk("東京 🚀"))
    assert mid["choices"][0]["delta"] == {"content": "東京 🚀"}
    assert mid["choices"][0]["finish_reason"] is None
    assert "東京" in chat.chunk("東京")  # not \u-escaped
    last = _parse_sse(chat.chunk(None, finish_reason="stop"))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = _parse_sse(chat.usage_chunk(Usage(4, 6)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 10

    comp = ResponseBuilder("t", "smol", chat=False)
    c = _parse_sse(comp.chunk(None, finish_reason="length"))
    assert c["object"] == "text_completion"
    assert c["choices"][0]["text"] == "" and c["choices"][0]["finish_reason"] == "length"
    assert SSE_DONE == "data: [DONE]\n\n"


# --------------------------------------------------------------------------- metrics


def _replica(replica: str, running: int, preemptions: int, steps: list[float]) -> str:
    m = EngineMetrics("smol", "decode", replica)
    m.running.set(running)
    m.kv_usage.set(0.25)
    m.preemptions.inc(preemptions)
    for s in steps:
        m.step_seconds.observe(s)
    return m.exposition()


def _sample_value(families, name: str, sample: str, **labels) -> float:
    values = [
        s.value
        for fam in families
        if fam.name == name
        for s in fam.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, (name, sample, labels, values)
    return values[0]


def _header_names(text: str, kind: str) -> list[str]:
    return [ln.split(" ", 3)[2] for ln in text.splitlines() if ln.startswith(f"# {kind} ")]


def test_merge_expositions_of_two_replicas() -> None:
    """Each family once, typed, with the samples of both replicas.

    BUG: counters come out as `# TYPE inferos:x counter` followed by `inferos:x_total`
    samples. In the text format the TYPE name of a counter is `x_total` (as
    `generate_latest` writes it); with the mismatch the parser yields an empty counter
    family plus one untyped family per replica's sample.
    """
    front = FrontendMetrics("smol", "ing0")
    front.success("stop")
    texts = [
        _replica("0", 3, 2, [0.003, 0.05]),
        _replica("1", 5, 0, [0.2]),
        front.exposition(),
    ]
    merged = merge_expositions(texts)
    helps, types = _header_names(merged, "HELP"), _header_names(merged, "TYPE")
    assert len(helps) == len(set(helps)) and helps == types
    assert not any("_created" in ln for ln in merged.splitlines())

    families = list(text_string_to_metric_families(merged))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), sorted(names)
    assert {f.type for f in families} <= {"gauge", "counter", "histogram"}
    for name in names:
        assert len({name, name + "_total"} & set(helps)) == 1, name

    get = _sample_value
    running = "inferos:num_requests_running"
    assert get(families, running, running, replica="0") == 3
    assert get(families, running, running, replica="1") == 5
    step = "inferos:engine_step_seconds"
    assert get(families, step, step + "_count", replica="0") == 2
    assert get(families, step, step + "_count", replica="1") == 1
    assert get(families, step, step + "_sum", replica="0") == pytest.approx(0.053)
    assert get(families, step, step + "_bucket", replica="0", le="0.005") == 1
    assert get(families, step, step + "_bucket", replica="1", le="+Inf") == 1
    assert {s.labels["replica"] for f in families for s in f.samples} == {"0", "1", "ing0"}
    types_by_name = {f.name: f.type for f in families}
    assert types_by_name[running] == "gauge" and types_by_name[step] == "histogram"
    pre = "inferos:num_preemptions"
    assert types_by_name.get(pre) == "counter"
    assert get(families, pre, pre + "_total", replica="0") == 2
    assert get(families, pre, pre + "_total", replica="1") == 0
    ok = "inferos:request_success"
    assert get(families, ok, ok + "_total", replica="ing0", finished_reason="stop") == 1


def test_merge_expositions_keeps_a_nan_gauge() -> None:
    """Prometheus values may be NaN; merging must not crash on them.

    BUG: `_fmt` evaluates `int(v)` for NaN (ValueError) and -Inf (OverflowError).
    """
    m = EngineMetrics("smol", "decode", "0")
    m.kv_usage.set(float("nan"))
    m.running.set(float("-inf"))
    families = list(text_string_to_metric_families(merge_expositions([m.exposition()])))
    kv = _sample_value(families, "inferos:kv_cache_usage_perc", "inferos:kv_cache_usage_perc")
    assert math.isnan(kv)
    run = "inferos:num_requests_running"
    assert _sample_value(families, run, run) == float("-inf")


# --------------------------------------------------------------------------- config


def test_config_defaults_are_valid() -> None:
    cfg = InferosConfig()
    assert cfg.kv_cache.num_blocks * cfg.kv_cache.block_size >= cfg.model.max_model_len
    ec = cfg.engine_config()
    assert isinstance(ec, EngineConfig)
    assert (ec.num_blocks, ec.block_size, ec.max_num_seqs) == (1024, 16, 64)
    assert (ec.max_num_batched_tokens, ec.max_model_len) == (512, 2048)
    assert ec.chunked_prefill  # the budget is shared by decode rows and prompt chunks
    assert ec.kv_dtype in ("float32", "bfloat16")
    assert cfg.ingress.torch_threads == 1 and cfg.ingress.num_cpus == 0.1


def test_config_rejects_a_pool_smaller_than_one_request() -> None:
    with pytest.raises(ValidationError, match="max_model_len"):
        InferosConfig(kv_cache={"num_blocks": 127, "block_size": 16}, model={"max_model_len": 2048})
    ok = InferosConfig(
        kv_cache={"num_blocks": 128, "block_size": 16}, model={"max_model_len": 2048}
    )
    assert ok.kv_cache.num_blocks == 128


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        InferosConfig(bogus=1)
    with pytest.raises(ValidationError):
        InferosConfig(model={"pth": "/x"})
    with pytest.raises(ValidationError):
        InferosConfig(kv_cache={"block_size": 12})
    with pytest.raises(ValidationError):
        InferosConfig(server={"port": 70000})
    with pytest.raises(ValidationError):
        InferosConfig(model={"dtype": "float16"})


def test_config_yaml_round_trip(tmp_path) -> None:
    cfg = InferosConfig(
        model={"dtype": "float32", "max_model_len": 512, "served_model_name": "smol"},
        kv_cache={"num_blocks": 64, "block_size": 8},
        scheduling={"max_num_seqs": 4},
        decode={"num_replicas": 2, "resources": {"NPU": 1.0}},
        server={"port": 9000, "api_key": "k"},
    )
    path = tmp_path / "inferos.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    loaded = InferosConfig.from_yaml(path)
    assert loaded == cfg
    assert loaded.engine_config().num_blocks == 64 and loaded.engine_config().block_size == 8

    partial = tmp_path / "partial.yaml"
    partial.write_text("scheduling:\n  max_num_seqs: 3\n")
    assert InferosConfig.from_yaml(partial).scheduling.max_num_seqs == 3
    assert InferosConfig.from_yaml(partial).model == InferosConfig().model
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert InferosConfig.from_yaml(empty) == InferosConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("kv_cache:\n  num_blocks: 64\n  colour: red\n")
    with pytest.raises(ValidationError):
        InferosConfig.from_yaml(bad)


def test_kv_profile_per_request_reaches_sampling_params_and_bad_ones_are_refused() -> None:
    import pydantic

    from serving.api.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = ChatCompletionRequest.model_validate(body | {"kv_profile": "safe"})
    assert req.sampling_params(8).kv_profile == "safe"
    assert ChatCompletionRequest.model_validate(body).sampling_params(8).kv_profile is None
    try:
        ChatCompletionRequest.model_validate(body | {"kv_profile": "turbo"})
    except pydantic.ValidationError as e:
        assert e.errors()[0]["loc"] == ("kv_profile",)
    else:
        raise AssertionError("an unknown profile was accepted")
