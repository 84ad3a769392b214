"""Kill a decode replica under streams running on the real app and read what the clients
received (issue 14, item 5: the streams complete as if nothing had happened)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import ray
from openai import APIStatusError

from tests.integration.conftest import MODEL


@dataclass
class StreamResult:
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None
    started: threading.Event = field(default_factory=threading.Event)


def stream_chat(app, prompt: str, session: str, max_tokens: int, out: StreamResult) -> None:
    """A greedy streamed chat of exactly `max_tokens` tokens; `out.started` is set after a
    few chunks (or on failure)."""
    try:
        stream = app.client(timeout=300).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Session-Id": session},
        )
        for chunk in stream:
            out.chunks += 1
            if out.chunks >= 4:
                out.started.set()
            if chunk.choices:
                out.text += chunk.choices[0].delta.content or ""
                out.finish_reason = chunk.choices[0].finish_reason or out.finish_reason
    except Exception as e:  # recorded, and the test fails on it
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.started.set()


def run_streams(
    app, prompts: dict[str, str], max_tokens: int, kill=None
) -> dict[str, StreamResult]:
    """The prompts streamed at once (session = key); `kill()` runs once every stream has
    its first chunks."""
    results = {s: StreamResult() for s in prompts}
    threads = [
        threading.Thread(target=stream_chat, args=(app, p, s, max_tokens, results[s]))
        for s, p in prompts.items()
    ]
    for t in threads:
        t.start()
    for r in results.values():
        assert r.started.wait(180), "a stream never started"
    if kill is not None:
        kill()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a stream hung after the kill"
    return results


def decode_actor(replica_id: str):
    """The Ray actor of the decode replica `replica_id` (Serve names it after the id)."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "decode" in actor["name"] and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for decode replica {replica_id}")


def kill_replica_of(app, session: str) -> str:
    """Kills (as a crash: Serve starts a new one) the decode replica serving `session`."""
    victim = ray.get(app.scheduler().snapshot.remote())["sessions"][f"h:{session}"]
    ray.kill(decode_actor(victim), no_restart=False)
    return victim


def seconds_until_a_request_succeeds(app, since: float, bound_s: float) -> float:
    client = app.client(timeout=60)
    while time.perf_counter() - since < bound_s:
        try:
            out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
            if out.choices[0].text:
                return time.perf_counter() - since
        except APIStatusError as e:
            assert e.status_code == 503, e  # unavailable while restarting, nothing else
        time.sleep(0.25)
    raise AssertionError(f"no request succeeded within {bound_s} s")
