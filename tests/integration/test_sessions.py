"""Multi-session serving on a real local Ray cluster with two decode replicas: KV re-used
across a conversation's turns, sessions spread over replicas and kept on theirs, and a
decode replica killed mid-stream."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from openai import APIError

from tests.integration.conftest import MODEL
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration

TIMEOUT_S = 20
TWO_DECODE = {
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


def _decode_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "decode" in actor["name"] and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for decode replica {replica_id}")


def test_killing_a_decode_replica_mid_stream_fails_its_streams_cleanly(two_decode) -> None:
    app = two_decode
    outcome: dict[str, object] = {"chunks": 0}
    started = threading.Event()

    def long_stream() -> None:
        try:
            stream = app.client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell a very long story."}],
                max_tokens=600,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
                extra_headers={"X-Session-Id": "victim"},
            )
            for _chunk in stream:
                outcome["chunks"] = int(outcome["chunks"]) + 1
                if outcome["chunks"] >= 3:
                    started.set()
            outcome["result"] = "completed"
        except APIError as e:
            outcome["result"] = f"error: {e}"
        finally:
            started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(120), "the stream never started"
    snap = ray.get(app.scheduler().snapshot.remote())
    victim = snap["sessions"]["h:victim"]
    ray.kill(_decode_actor(victim), no_restart=False)
    thread.join(120)
    assert not thread.is_alive(), "the stream hung after its decode replica died"
    assert str(outcome.get("result", "")).startswith("error:"), outcome
    assert "decode" in str(outcome["result"])

    # New requests succeed on the survivor (Serve restarts the dead one in the background).
    deadline = time.monotonic() + 60
    answered = 0
    while answered < 3 and time.monotonic() < deadline:
        try:
            resp = _chat(app, [{"role": "user", "content": "Say hi."}], f"after-{answered}")
            assert resp.choices[0].finish_reason in ("stop", "length")
            answered += 1
        except APIError:
            time.sleep(1)
    assert answered == 3
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
