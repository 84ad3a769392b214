"""The control API on the live app: token checks, refused bodies change nothing, a profile
change shows up in GET /v1/metrics and reaches the scheduler; reads stay open."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from tests.integration.conftest import ADMIN_TOKEN, MODEL, LiveApp

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def live(app: LiveApp) -> Iterator[LiveApp]:
    """The shared app, its policy put back afterwards (other modules expect the default)."""
    with app.http() as h:
        before = h.get("/v1/policy").json()
    yield app
    restore = {k: before[k] for k in ("kv_profile", "kv_window", "pd_mode", "speculation")}
    with app.http() as h:
        assert h.post("/v1/policy", json=restore, headers=AUTH).status_code == 200


def test_changes_are_refused_without_the_right_token(live: LiveApp) -> None:
    with live.http() as h:
        version = h.get("/v1/policy").json()["version"]
        r = h.post("/v1/policy", json={"kv_profile": "safe"})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        r = h.post("/v1/policy", json={"kv_profile": "safe"}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_admin_token"
        # the right token, but not in the Bearer form: refused as missing (issue 14, item 4)
        r = h.post(
            "/v1/run-context", json={"target_ttft_s": 1}, headers={"Authorization": ADMIN_TOKEN}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_admin_token"
        for body, needle in (
            ({"kv_profile": "reckless"}, "kv_profile"),
            ({"pd_mode": "both"}, "pd_mode"),
            ({"kv_window": -1}, "kv_window"),
            ({"profile": "safe"}, "unknown field"),
        ):
            r = h.post("/v1/policy", json=body, headers=AUTH)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        r = h.post("/v1/policy", content=b"{", headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 400
        assert h.get("/v1/policy").json()["version"] == version  # nothing changed
        # reads are open, like /metrics
        assert h.get("/v1/health").status_code == 200
        assert h.get("/v1/metrics").status_code == 200


def test_profile_change_shows_in_metrics_and_reaches_the_scheduler(live: LiveApp) -> None:
    # some traffic first, so the live numbers have something to show
    reply = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12
    )
    assert reply.usage.completion_tokens > 0
    with live.http() as h:
        r = h.post("/v1/policy", json={"kv_profile": "balanced", "kv_window": 128}, headers=AUTH)
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        snap = h.get("/v1/metrics").json()
    assert snap["policy"]["kv_profile"] == "balanced" and snap["policy"]["kv_window"] == 128
    assert snap["policy"]["version"] == version
    assert snap["model"] == MODEL
    assert snap["ttft_s"]["p50"] is not None and snap["ttft_s"]["p50"] > 0
    assert set(snap["kv_bytes_per_level"]) == {"L0", "L1", "L2", "L3"}
    roles = {key.split("/")[0] for key in snap["replicas"]}
    assert roles == {"prefill", "decode"}
    assert all(0 <= r["utilisation"] <= 1 for r in snap["replicas"].values())
    assert ray.get(live.scheduler().get_policy.remote()).kv_profile == "balanced"


def test_run_context_is_stored_and_returned(live: LiveApp) -> None:
    ctx = {"expected_seq_len": 256, "expected_batch_size": 4, "target_ttft_s": 0.5}
    with live.http() as h:
        r = h.post("/v1/run-context", json=ctx, headers=AUTH)
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in ctx} == ctx
        r = h.post("/v1/run-context", json={"expected_seq_len": 10**7}, headers=AUTH)
        assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
        assert h.get("/v1/metrics").json()["run_context"]["expected_batch_size"] == 4
