"""Colocated mode: the decode replica prefills itself, with the same greedy output."""

from __future__ import annotations

import pytest
import ray

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]


def _greedy(app) -> str:
    resp = app.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0
    )
    return resp.choices[0].message.content


def test_colocated_prefill_on_the_decode_replica_gives_the_same_tokens(app) -> None:
    scheduler = app.scheduler()
    decode = app.deployment("decode")
    disaggregated = _greedy(app)
    before = decode.stats.remote().result()
    ray.get(scheduler.set_pd_mode.remote("colocated"))
    try:
        colocated = _greedy(app)
        with app.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stream=True
        ) as stream:
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        ray.get(scheduler.set_pd_mode.remote("disaggregated"))
    after = decode.stats.remote().result()
    assert colocated == disaggregated
    assert streamed == disaggregated
    assert after["num_local_prefills"] == before["num_local_prefills"] + 2
    assert after["num_imported"] == before["num_imported"]
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(scheduler.set_pd_mode.remote("sideways"))
