"""Speculative decoding in the running app (real Ray, real model in fp32, official openai
client): switched on and off at run time through the policy, greedy answers are the same
token for token, the `inferos:spec_decode_*` counters move, and the decode replica's JSON
stats carry per-request acceptance."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import ADMIN_TOKEN, MODEL

# n-gram drafts hit on a prompt the answer copies from; the truncated draft (default
# method) is covered by the unit tests on the engine.
SPEC = {"speculation": {"enabled": True, "method": "ngram", "k_max": 4}}
PROMPTS = [
    "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.",
    "Copy this list: apples, pears, plums, cherries, apples, pears, plums, cherries.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def spec_app(apps):
    return apps.get(SPEC)


def _set_speculation(app, on: bool) -> None:
    with app.http() as h:
        r = h.post(
            "/v1/policy",
            json={"speculation": on},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert r.status_code == 200, r.text
    assert r.json()["speculation"] is on


def _decode_stats(app) -> dict:
    return app.deployment("decode").stats.remote().result()


def _wait_enabled(app, on: bool) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _decode_stats(app)["spec_decode"]["enabled"] is on:
            return
        time.sleep(0.2)
    raise AssertionError(f"decode replica did not switch speculation to {on}")


def _answers(app) -> list[str]:
    client = app.client()
    out = []
    for prompt in PROMPTS:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=48,
            temperature=0,
        )
        out.append(r.choices[0].message.content)
    return out


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and 'role="decode"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _answers_off_then_on(app) -> tuple[list[str], list[str]]:
    """The greedy answers with speculation switched off, then on (run-time policy)."""
    _set_speculation(app, False)
    _wait_enabled(app, False)
    plain = _answers(app)
    _set_speculation(app, True)
    _wait_enabled(app, True)
    return plain, _answers(app)


def test_greedy_answers_identical_with_speculation_on_and_off(spec_app) -> None:
    plain, speculative = _answers_off_then_on(spec_app)
    assert speculative == plain
    stats = _decode_stats(spec_app)["spec_decode"]
    assert stats["method"] == "ngram" and stats["num_draft_tokens"] > 0
    assert stats["num_accepted_tokens"] > 0
    per_request = stats["requests"]
    assert per_request and all(0.0 <= r["acceptance_rate"] <= 1.0 for r in per_request.values())


def test_spec_decode_metrics_are_exported(spec_app) -> None:
    _set_speculation(spec_app, True)
    _wait_enabled(spec_app, True)
    _answers(spec_app)
    stats = _decode_stats(spec_app)["spec_decode"]
    deadline = time.monotonic() + 15  # metrics travel with the 1 s load reports
    text = ""
    name = "inferos:spec_decode_num_draft_tokens_total"
    while time.monotonic() < deadline:
        text = spec_app.metrics_text()
        if _counter(text, name) >= stats["num_draft_tokens"]:
            break
        time.sleep(0.5)
    drafts = _counter(text, "inferos:spec_decode_num_drafts_total")
    draft_tokens = _counter(text, "inferos:spec_decode_num_draft_tokens_total")
    accepted = _counter(text, "inferos:spec_decode_num_accepted_tokens_total")
    per_pos = _counter(text, "inferos:spec_decode_num_accepted_tokens_per_pos_total")
    assert draft_tokens >= stats["num_draft_tokens"] > 0
    assert 0 < drafts <= draft_tokens
    assert 0 < accepted <= draft_tokens
    assert per_pos == accepted  # every accepted token has a position


# The draft in its own `draft` deployment (a draft model on another device): a truncated
# view of the target (all layers, the 16k-token head) with its own paged KV, one batched
# call per engine step.
DRAFT_DEPLOYMENT = {
    "speculation": {
        "enabled": True,
        "method": "truncated",
        "placement": "deployment",
        "num_draft_layers": 30,
        "k_max": 3,
    }
}


def test_draft_deployment_drafts_for_the_decode_replica(apps) -> None:
    app = apps.get(DRAFT_DEPLOYMENT)
    draft = app.deployment("draft")
    calls_before = draft.stats.remote().result()["num_calls"]
    plain, speculative = _answers_off_then_on(app)
    assert speculative == plain  # greedy: the target's tokens, whoever drafts them

    stats = _decode_stats(app)["spec_decode"]
    assert stats["method"] == "truncated@deployment"
    assert stats["num_draft_tokens"] > 0 and stats["num_accepted_tokens"] > 0
    after = draft.stats.remote().result()
    assert after["method"] == "truncated"
    assert after["num_calls"] > calls_before
    # finished requests release their draft KV (fire-and-forget calls: allow them to land)
    deadline = time.monotonic() + 10
    while after["num_sequences"] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = draft.stats.remote().result()
    assert after["num_sequences"] == 0 and after["num_blocks_used"] == 0
