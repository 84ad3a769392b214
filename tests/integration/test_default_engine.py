"""The product defaults on a CPU-only node: one engine (no prefill replica; the decode
replica prefills in chunks mixed into its decode steps), n-gram speculation on, prefix
reuse through the kv_store for the decode replica's own prefills. Greedy output in fp32
still equals transformers', turn after turn, the later turns reusing the earlier ones'
KV (their answers included)."""

from __future__ import annotations

import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.models.pull import ensure_default_model
from tests.integration.conftest import MODEL
from tests.integration.failover_util import (
    kill_replica_of,
    run_streams,
    seconds_until_a_request_succeeds,
)
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration

# fp32 for the comparison with transformers; everything else is the product's default
DEFAULTS = {"scheduling": {"pd_mode": "auto"}, "speculation": {"enabled": True}}
STORY = "Tell me a long story about a dragon who learns to read."
NUM_TOKENS = 32
REUSED_LOCALLY = "prefix_cache_hit_tokens"  # decode stats: tokens the engine's own cache held
KILLED_STREAM_TOKENS = 96
# a new request right after the kill waits for Serve's new replica: measured ~15 s here
RECOVERY_BOUND_S = 90.0


@pytest.fixture(scope="module")
def hf():
    folder = ensure_default_model(progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return tok, model


def _hf_greedy(hf, messages: list[dict], num_tokens: int) -> tuple[list[int], str]:
    tok, model = hf
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
        )
    return ids, tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def _chat(app, messages: list[dict], session: str) -> str:
    resp = app.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=NUM_TOKENS,
        temperature=0,
        extra_body={"min_tokens": NUM_TOKENS},
        extra_headers={"X-Session-Id": session},
    )
    assert resp.usage.completion_tokens == NUM_TOKENS
    return resp.choices[0].message.content


def test_one_engine_per_node_by_default(apps) -> None:
    app = apps.get(DEFAULTS)
    snapshot = ray.get(app.scheduler().snapshot.remote())
    assert snapshot["prefill"] == {} and len(snapshot["decode"]) == 1
    assert app.http().get("/health").json() == {"status": "ok"}
    stats = app.deployment("decode").stats.remote().result()
    assert stats["spec_decode"] is not None, "speculation is not configured by default"


def test_turns_equal_transformers_and_reuse_the_earlier_turns(apps, hf) -> None:
    app = apps.get(DEFAULTS)
    decode = app.deployment("decode")
    messages = [{"role": "user", "content": STORY}]
    previous_ids: list[int] = []
    for turn in range(3):
        before = decode.stats.remote().result()
        prompt_ids, expected = _hf_greedy(hf, messages, NUM_TOKENS)
        text = _chat(app, messages, "dragon-story")
        assert text == expected, f"turn {turn}"
        after = decode.stats.remote().result()
        assert after["num_local_prefills"] == before["num_local_prefills"] + 1
        # from the engine's own prefix cache, or the store where it holds more
        reused = sum(after[k] - before[k] for k in ("num_reused_tokens", REUSED_LOCALLY))
        block = app.config.kv_cache.block_size
        assert reused % block == 0 and reused < len(prompt_ids)
        if turn > 0:
            # the earlier turns' prompts and answers came from the store, bar the tail of
            # the last turn that did not fill a block and the end-of-turn tokens the template
            # adds after an answer (turn 0 may reuse as much as another chat shares with it:
            # the template's system prompt)
            assert reused >= len(previous_ids) + NUM_TOKENS - 2 * block, (reused, turn)
            # one engine, one conversation: its pool still holds the earlier turns
            assert after[REUSED_LOCALLY] - before[REUSED_LOCALLY] == reused, (before, after)
        previous_ids = prompt_ids
        messages = [
            *messages,
            {"role": "assistant", "content": text},
            {"role": "user", "content": "Go on with the story."},
        ]


def test_logprobs_and_repetition_penalty_with_speculation(apps, hf) -> None:
    """Colocated (the decode replica's own first token and prompt logprobs) with n-gram
    speculation: logprobs still equal transformers', and a repetition penalty gives
    transformers' greedy answer under the same penalty (the same rule: a seen token's
    logit divided if positive, multiplied if not, over prompt and output)."""
    from tests.integration.test_sampling_api import (
        Reference,
        check_chat_logprobs,
        check_completion_echo_logprobs,
    )

    app = apps.get(DEFAULTS)
    ref = Reference(*hf)
    check_chat_logprobs(app, ref)
    check_completion_echo_logprobs(app, ref, stream=True)
    tok, model = hf
    messages = [{"role": "user", "content": STORY}]
    ids = ref.chat_ids(messages)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NUM_TOKENS,
            min_new_tokens=NUM_TOKENS,
            do_sample=False,
            repetition_penalty=1.3,
        )
    expected = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    resp = app.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=NUM_TOKENS,
        temperature=0,
        extra_body={"min_tokens": NUM_TOKENS, "repetition_penalty": 1.3},
    )
    assert resp.choices[0].message.content == expected


def test_a_killed_engine_replica_loses_no_stream(apps) -> None:
    """The node's one engine replica killed under four streams: each waits for Serve to
    start a new replica and resumes there after the tokens it had sent; the client sees the
    text it sees without the kill (greedy, fp32, speculation on). Runs last in this module:
    the replica it kills is a new one afterwards."""
    app = apps.get(DEFAULTS)
    prompts = {
        f"engine-kill-{i}": f"Write a long list of facts about the number {i}." for i in range(4)
    }
    reference = run_streams(app, prompts, KILLED_STREAM_TOKENS)
    recovery: list[float] = []

    def kill() -> None:  # and a new request at once, while the streams resume
        kill_replica_of(app, "engine-kill-0")
        killed = time.perf_counter()
        recovery.append(seconds_until_a_request_succeeds(app, killed, RECOVERY_BOUND_S))

    results = run_streams(app, prompts, KILLED_STREAM_TOKENS, kill)
    for session, result in results.items():
        assert result.error is None, (session, result.error)
        assert result.finish_reason == "length", session
        assert result.text == reference[session].text, session
    assert total(app.metrics_text(), "inferos:stream_resumes_total") >= len(prompts)
    stats = app.deployment("decode").stats.remote().result()
    assert stats["num_resumed"] == len(prompts)  # the new replica resumed every stream
    print(f"a new request succeeded {recovery[0]:.1f} s after the kill")


def test_n_choices_share_the_prompt_are_seeded_distinct_and_stream_by_index(apps) -> None:
    """n > 1 (issue 15, item 2) on the product defaults: the choices are computed on one
    engine that shares the prompt's KV blocks, a seed makes them reproducible (streamed or
    not) and they differ from each other."""
    app = apps.get(DEFAULTS)
    client = app.client()
    decode = app.deployment("decode")
    prompt = "Write three different names for a small grey cat that lives in a library: " * 3
    shared_before = decode.stats.remote().result()["kv_blocks_shared"]
    ask = dict(model=MODEL, prompt=prompt, n=3, seed=11, max_tokens=24, temperature=1.0)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices], "the same seed gave other choices"
    assert len(set(texts)) == 3, texts
    assert first.usage.prompt_tokens == client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1
    ).usage.prompt_tokens  # the prompt counted once
    shared = decode.stats.remote().result()["kv_blocks_shared"] - shared_before
    full_blocks = (first.usage.prompt_tokens - 1) // app.config.engine_config().block_size
    assert shared == 2 * 2 * full_blocks, "choices 1 and 2 of both requests share the prompt"

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = dict(model=MODEL, messages=messages, n=2, seed=5, max_tokens=12, temperature=1.0)
    whole = client.chat.completions.create(**chat)
    streamed: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(
        **chat, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finished[c.index] = c.finish_reason
    assert streamed == {c.index: c.message.content for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
