"""Staged KV on the real app: more concurrent sessions than the KV budgets hold at full
precision all finish with the right answers; the store demoted and spilled; a spilled
session's next turn completes and re-uses its stored KV."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

from policies.control import PROFILE_DELTA_PPL_PCT
from tests.integration.conftest import MODEL
from tests.integration.metrics_util import total
from tests.integration.test_handoff import _hf_greedy

pytestmark = pytest.mark.integration

WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2-dev.txt"
NUM_SESSIONS = 6
ANSWER_TOKENS = 10
BLOCK_BYTES_FP32 = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M, block_size 16, fp32 KV
# ~700-token prompts: 45 blocks each at L0. The decode engine's pool holds 4 such sessions
# (180 blocks) and the store 2, so both must demote (and the store spill) to serve 6.
STAGED = {
    "kv_cache": {
        # the store's tiers are under test: the engines keep no prefixes of their own, so a
        # spilled session's next turn must come back from the store's disk
        "enable_prefix_caching": False,
        "profile": "safe",
        "num_blocks": 180,
        "store_budget_bytes": 2 * 45 * BLOCK_BYTES_FP32,
    }
}


def _articles(n: int, words: int) -> list[str]:
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} is absent: the staged-KV test needs long real text")
    text = " ".join(WIKITEXT.read_text(encoding="utf-8").split())
    chunk = text.split(" ")
    return [" ".join(chunk[i * words * 2 : i * words * 2 + words]) for i in range(n)]


def _messages(article: str) -> list[dict]:
    return [{"role": "user", "content": f"{article}\n\nSummarize the text above in one line."}]


@pytest.fixture(scope="module")
def staged_app(apps):
    return apps.get(STAGED)


def test_sessions_beyond_the_budget_finish_right_and_a_spilled_one_resumes(staged_app) -> None:
    app = staged_app
    sessions = [_messages(a) for a in _articles(NUM_SESSIONS, 580)]
    client = app.client(timeout=600)

    def ask(messages: list[dict]):
        return client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            extra_body={"min_tokens": ANSWER_TOKENS},
        )

    with ThreadPoolExecutor(NUM_SESSIONS) as pool:
        answers = list(pool.map(ask, sessions))
    for resp in answers:
        assert resp.usage.prompt_tokens > 40 * 16  # really ~700 tokens
        assert resp.usage.completion_tokens == ANSWER_TOKENS

    # Right answers: INT8 ('safe') keeps greedy decoding on transformers' tokens.
    for messages, resp in list(zip(sessions, answers, strict=True))[:2]:
        _, expected = _hf_greedy(messages, ANSWER_TOKENS)
        assert resp.choices[0].message.content == expected

    store = app.kv_store()
    stats = ray.get(store.stats.remote())
    assert stats["demoted_blocks"] > 0, stats
    assert stats["spilled_blocks"] > 0, stats
    assert stats["num_bytes"] <= stats["budget_bytes"], stats
    entries = [ray.get(store.lookup.remote(f"kv-{r.id}")) for r in answers]
    assert all(e is not None for e in entries), "a session's KV was lost"
    spilled = [(m, r) for m, r, e in zip(sessions, answers, entries, strict=True) if e["spilled"]]
    assert spilled, entries
    assert any("L1" in e["levels"] for e in entries), entries

    # The decode engine held more sessions than its pool fits at full precision: its KV
    # came quantized from the store or it demoted its own, and nothing was preempted.
    decode = app.deployment("decode").stats.remote().result()
    assert decode["kv_demotions"] + decode["kv_units_imported"] > 0, decode
    text = app.metrics_text()
    assert total(text, "inferos:num_preemptions_total", role="decode") == 0
    assert total(text, "inferos:kv_demotions_total", role="kv_store") > 0
    # the active profile's measured quality cost, published for dashboards
    assert total(text, "inferos:kv_delta_ppl_estimate", role="kv_store") == pytest.approx(
        PROFILE_DELTA_PPL_PCT["safe"] / 100
    )
    assert total(text, "inferos:kv_bytes_per_level", role="kv_store", level="L3") > 0

    # A spilled session's next turn: reloaded from disk, its prefix re-used, answered.
    messages, first = spilled[0]
    prefill_before = app.deployment("prefill").stats.remote().result()
    reloads_before = stats["num_reloads"]
    turn2 = [
        *messages,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Now say it in five words."},
    ]
    resp = ask(turn2)
    assert resp.usage.completion_tokens == ANSWER_TOKENS
    assert resp.choices[0].message.content.strip()
    after = ray.get(store.stats.remote())
    assert after["num_reloads"] > reloads_before
    prefill_after = app.deployment("prefill").stats.remote().result()
    reused = prefill_after["num_reused_tokens"] - prefill_before["num_reused_tokens"]
    assert reused >= first.usage.prompt_tokens - 16  # all of turn 1's whole blocks
