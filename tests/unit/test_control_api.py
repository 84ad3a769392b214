"""Control API routes over the real scheduler actor class used as a plain object (no Ray):
auth (401/403), validation (400, nothing changed), changes visible in /v1/metrics.
The integration test (tests/integration/test_control_api.py) repeats the core on the live app."""

from __future__ import annotations

import inspect

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from deployments.control_api import ControlAPI, control_router
from deployments.scheduler import SchedulerActor
from serving.api.errors import ServeError
from serving.config import InferosConfig
from serving.metrics import FrontendMetrics, StoreMetrics

TOKEN = "s3cret-admin"


class Local:
    """Stands in for a Ray actor handle: `handle.method.remote(...)` is awaitable."""

    def __init__(self, obj: object):
        self._obj = obj

    def __getattr__(self, name: str):
        method = getattr(self._obj, name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def call():
                    out = method(*args, **kwargs)
                    return await out if inspect.isawaitable(out) else out

                return call()

        return _Method


class Store:
    def __init__(self) -> None:
        self.metrics = StoreMetrics("m")

    def metrics_text(self) -> str:
        return self.metrics.exposition()


def make_client(admin_token: str | None = TOKEN, **server) -> tuple[TestClient, SchedulerActor]:
    config = InferosConfig.model_validate({"server": {"admin_token": admin_token, **server}})
    scheduler = SchedulerActor(config.model_dump())
    app = FastAPI()
    app.include_router(control_router)

    @app.exception_handler(ServeError)
    async def _err(_: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.http_status)

    app.state.control = ControlAPI(
        config, "m", "ingress-1", Local(scheduler), Local(Store()), FrontendMetrics("m", "i")
    )
    return TestClient(app), scheduler


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_changes_need_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    client, scheduler = make_client()
    r = client.post("/v1/policy", json={"kv_profile": "safe"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/policy", json={"kv_profile": "safe"}, headers=auth("wrong"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_admin_token"
    r = client.post("/v1/run-context", json={"target_ttft_s": 1.0}, headers=auth("nope"))
    assert r.status_code == 403
    assert scheduler.policy.version == 0 and scheduler.run_context is None
    # no token configured anywhere: changes refused outright, reads still work
    monkeypatch.delenv("INFEROS_ADMIN_TOKEN", raising=False)
    closed, _ = make_client(admin_token=None)
    r = closed.post("/v1/policy", json={"kv_profile": "safe"}, headers=auth())
    assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
    assert closed.get("/v1/policy").json()["kv_profile"] == "baseline"
    # the environment variable is the fallback
    monkeypatch.setenv("INFEROS_ADMIN_TOKEN", "from-env")
    env_client, _ = make_client(admin_token=None)
    r = env_client.post("/v1/policy", json={"kv_profile": "safe"}, headers=auth("from-env"))
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"kv_profile": "reckless"}, "kv_profile"),
        ({"pd_mode": "sideways"}, "pd_mode"),
        ({"kv_window": -3}, "kv_window"),
        ({"speculation": "maybe"}, "speculation"),
        ({"profile": "safe"}, "valid fields: kv_profile, kv_window, pd_mode, speculation"),
        ({"version": 7}, "version"),
        ({}, "nothing to change"),
    ],
)
def test_invalid_policy_bodies_are_refused_and_change_nothing(body: dict, needle: str) -> None:
    client, scheduler = make_client()
    r = client.post("/v1/policy", json=body, headers=auth())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    assert scheduler.policy.version == 0


def test_malformed_json_is_a_400() -> None:
    client, _ = make_client()
    r = client.post(
        "/v1/policy", content=b"{nope", headers={**auth(), "content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_policy_change_reaches_the_scheduler_and_the_metrics_snapshot() -> None:
    client, scheduler = make_client()
    r = client.post(
        "/v1/policy",
        json={"kv_profile": "balanced", "pd_mode": "colocated", "kv_window": 256},
        headers=auth(),
    )
    assert r.status_code == 200
    assert r.json()["kv_profile"] == "balanced" and r.json()["version"] == 1
    assert scheduler.policy.pd_mode == "colocated"
    snap = client.get("/v1/metrics").json()
    assert snap["policy"]["kv_profile"] == "balanced" and snap["policy"]["kv_window"] == 256
    assert set(snap["kv_bytes_per_level"]) == {"L0", "L1", "L2", "L3"}
    for key in ("tokens_per_s", "ttft_s", "itl_s", "replicas", "spec_decode"):
        assert key in snap


def test_run_context_is_validated_and_stored() -> None:
    client, scheduler = make_client()
    ctx = {"expected_seq_len": 512, "expected_batch_size": 8, "target_ttft_s": 0.5}
    r = client.post("/v1/run-context", json=ctx, headers=auth())
    assert r.status_code == 200 and r.json() == {**ctx, "quality_budget": None, "version": 1}
    assert scheduler.run_context is not None and scheduler.run_context.expected_batch_size == 8
    for bad, needle in (
        ({"expected_seq_len": 10**6}, "max_model_len"),
        ({"target_ttft_s": 0}, "target_ttft_s"),
        ({"quality_budget": 3}, "quality_budget"),
        ({"batch": 4}, "unknown field"),
    ):
        r = client.post("/v1/run-context", json=bad, headers=auth())
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (bad, r.text)
    assert scheduler.run_context.version == 1  # unchanged by the refused bodies
    assert client.get("/v1/metrics").json()["run_context"]["expected_seq_len"] == 512


def test_console_files_are_served_and_nothing_else() -> None:
    client, _ = make_client()
    index = client.get("/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    for src in ("/console/app.js", "/console/charts.js", "/console/style.css"):
        assert src in index.text
        assert client.get(src).status_code == 200
    assert client.get("/console/..%2Fcontrol_api.py").status_code == 404
    assert client.get("/console/index.html").status_code == 404


def test_health_is_open_and_says_starting_without_replicas() -> None:
    client, _ = make_client()
    r = client.get("/v1/health")
    assert r.status_code == 503 and r.json()["status"] == "starting"


def test_cli_admin_token_and_telemetry_flags(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.cli import build_config, make_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFEROS_ADMIN_TOKEN", "from-env")
    cfg = build_config(make_parser().parse_args(["serve", "--telemetry-dir", "logs"]))
    assert cfg.server.admin_token == "from-env"
    # absolute: Ray workers do not run in the driver's working directory
    assert cfg.server.telemetry_dir == str(tmp_path / "logs")
    cfg = build_config(make_parser().parse_args(["serve", "--admin-token", "flag"]))
    assert cfg.server.admin_token == "flag" and cfg.server.telemetry_dir is None


def test_each_ingress_replica_shows_the_others_metrics() -> None:
    """With several ingress replicas, a scrape reaches one of them; its page must still carry
    every ingress replica's request metrics, and its own only once."""
    import asyncio

    config = InferosConfig.model_validate({"ingress": {"num_replicas": 2}})
    scheduler, store = Local(SchedulerActor(config.model_dump())), Local(Store())
    fronts = [FrontendMetrics("m", rid) for rid in ("a", "b")]

    async def run() -> str:
        apis = [ControlAPI(config, "m", f.labels["replica"], scheduler, store, f) for f in fronts]
        fronts[0].generation_tokens.inc(5)
        fronts[1].generation_tokens.inc(7)
        await apis[0].push_metrics()
        await apis[1].push_metrics()
        fronts[1].generation_tokens.inc(1)  # after b's push: b's own page is fresher
        page = await apis[1].exposition()
        for api in apis:
            api._push_task.cancel()
        return page

    from tests.integration.metrics_util import samples

    page = asyncio.run(run())
    found = {lb["replica"]: v for lb, v in samples(page, "inferos:generation_tokens_total")}
    assert found == {"a": 5.0, "b": 8.0}
