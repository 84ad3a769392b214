"""Multi-session serving on a real local Ray cluster with two decode replicas: KV re-used
across a conversation's turns, sessions spread over replicas and kept on theirs, and a
decode replica killed mid-stream without losing a stream."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from openai import APIError

from tests.integration.conftest import MODEL
from tests.integration.failover_util import (
    kill_replica_of,
    run_streams,
    seconds_until_a_request_succeeds,
)
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration

TIMEOUT_S = 20
MAX_TOKENS_KILLED = 120
RECOVERY_BOUND_S = 30.0  # measured: a few seconds (the survivor answers at once)
TWO_DECODE = {
    # the kv_store's reuse across replicas is under test: the engines keep no prefixes of
    # their own (test_default_engine covers theirs), so every turn's prefix comes from it
    "kv_cache": {"enable_prefix_caching": False},
    "decode": {"num_replicas": 2, "num_cpus": 0.3},
    "prefill": {"num_cpus": 0.3},
    "scheduling": {"request_timeout_s": TIMEOUT_S},
}
HISTORY = (
    "You are a careful assistant. Here is a long note about the project. "
    + " ".join(f"Item {i}: the system keeps KV blocks of earlier turns." for i in range(20))
)


@pytest.fixture(scope="module")
def two_decode(apps):
    return apps.get(TWO_DECODE)


def _chat(app, messages: list[dict], session: str, max_tokens: int = 8):
    return app.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_headers={"X-Session-Id": session},
    )


def _next_turn(messages: list[dict], resp, text: str) -> list[dict]:
    return [
        *messages,
        {"role": "assistant", "content": resp.choices[0].message.content},
        {"role": "user", "content": text},
    ]


def test_second_turn_reuses_the_first_turns_kv(two_decode) -> None:
    app = two_decode
    turn1 = [{"role": "user", "content": HISTORY + " Summarize it."}]
    first = _chat(app, turn1, "reuse-1")
    before = app.deployment("prefill").stats.remote().result()
    hits_before = total(app.metrics_text(), "inferos:prefix_cache_hits_total")
    second = _chat(app, _next_turn(turn1, first, "Shorter, please."), "reuse-1")
    after = app.deployment("prefill").stats.remote().result()
    reused = after["num_reused_tokens"] - before["num_reused_tokens"]
    computed = after["num_computed_prompt_tokens"] - before["num_computed_prompt_tokens"]
    block = app.config.kv_cache.block_size
    # every whole block of turn 1's prompt came from the store; only the rest was computed
    assert reused == (first.usage.prompt_tokens // block) * block
    assert computed == second.usage.prompt_tokens - reused
    assert computed < second.usage.prompt_tokens / 3
    assert total(app.metrics_text(), "inferos:prefix_cache_hits_total") - hits_before == reused


def test_sessions_spread_over_decode_replicas_and_stay_across_turns(two_decode) -> None:
    app = two_decode
    sessions = {
        f"spread-{i}": [{"role": "user", "content": f"Count to {i + 3}."}] for i in range(4)
    }
    placements: dict[str, list[str]] = {s: [] for s in sessions}
    results: dict[str, object] = {}

    def run(sid: str) -> None:
        results[sid] = _chat(app, sessions[sid], sid, max_tokens=12)

    for _turn in range(2):
        threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        snap = ray.get(app.scheduler().snapshot.remote())
        for sid in sessions:
            placements[sid].append(snap["sessions"][f"h:{sid}"])
            sessions[sid] = _next_turn(sessions[sid], results[sid], "And back down.")
    assert all(len(set(p)) == 1 for p in placements.values()), placements  # stayed
    assert len({p[0] for p in placements.values()}) == 2, placements  # spread over both


def test_killing_a_decode_replica_mid_stream_loses_no_stream(two_decode) -> None:
    """Streams on both replicas; the one of session "victim-0" is killed. Every stream
    completes with the text it has without the kill (fp32, greedy): those on the dead
    replica resume on the survivor after the tokens they had sent."""
    app = two_decode
    prompts = {f"victim-{i}": f"Tell a very long story about the number {i}." for i in range(4)}
    reference = run_streams(app, prompts, MAX_TOKENS_KILLED)
    resumes_before = total(app.metrics_text(), "inferos:stream_resumes_total")

    recovery: list[float] = []

    def kill() -> None:  # and a new request at once, while the streams resume
        kill_replica_of(app, "victim-0")
        killed = time.perf_counter()
        recovery.append(seconds_until_a_request_succeeds(app, killed, RECOVERY_BOUND_S))

    results = run_streams(app, prompts, MAX_TOKENS_KILLED, kill)
    for session, result in results.items():
        assert result.error is None, (session, result.error)
        assert result.finish_reason == "length", session
        assert result.text == reference[session].text, session
    assert total(app.metrics_text(), "inferos:stream_resumes_total") > resumes_before
    # the new request in kill(): served by the survivor (Serve restarts the dead one)
    print(f"a new request succeeded {recovery[0]:.1f} s after the kill")
    with httpx.Client(base_url=app.url, timeout=30) as h:
        assert h.get("/health").status_code == 200


def test_a_request_past_its_timeout_ends_cleanly_and_others_go_on(two_decode) -> None:
    app = two_decode
    outcome: dict[str, object] = {}

    def too_long() -> None:
        try:
            app.client(timeout=120).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Write forever."}],
                max_tokens=1800,
                temperature=0,
                extra_body={"ignore_eos": True},
                extra_headers={"X-Session-Id": "slow"},
            )
            outcome["result"] = "completed"
        except APIError as e:
            outcome["result"] = e

    started = time.monotonic()
    thread = threading.Thread(target=too_long)
    thread.start()
    short = _chat(app, [{"role": "user", "content": "Say yes."}], "quick")
    assert short.choices[0].finish_reason in ("stop", "length")
    thread.join(120)
    error = outcome["result"]
    assert isinstance(error, APIError), error
    assert error.status_code == 503
    assert error.body["code"] == "request_timeout"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 30
    # its sequence was aborted: the decode replicas drain
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        snap = ray.get(app.scheduler().snapshot.remote())
        if sum(s["num_running"] for s in snap["decode"].values()) == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the timed-out request kept running on decode")
