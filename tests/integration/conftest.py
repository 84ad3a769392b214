"""One real local Ray cluster running the real app with the real default model, shared by
every integration test (starting it costs ~30 s on a 2-core box)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import ray
from openai import OpenAI
from ray import serve

from deployments.actors import KV_STORE_NAME, NAMESPACE, SCHEDULER_NAME
from deployments.app import APP_NAME
from deployments.direct_http import free_port
from serving.config import InferosConfig

MODEL = "SmolLM2-135M-Instruct"
# Few enough in-flight requests that a test can saturate the ingress on purpose.
MAX_PENDING = 20
# The control API's changes need it (tests/integration/test_control_api.py, test_console.py).
ADMIN_TOKEN = "integration-admin-token"


@dataclass
class LiveApp:
    url: str
    config: InferosConfig

    def client(self, **kw) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def deployment(self, name: str):
        return serve.get_deployment_handle(name, app_name=APP_NAME)

    def kv_store(self):
        return ray.get_actor(KV_STORE_NAME, namespace=NAMESPACE)

    def scheduler(self):
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)

    def metrics_text(self) -> str:
        with self.http() as h:
            return h.get("/metrics").text


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# fp32 weights so greedy output can be compared token for token with transformers. The
# shared test app is disaggregated without speculation (a prefill replica, KV through the
# store: what a node with separate devices runs); test_default_engine.py runs the product
# defaults (one engine, speculation on).
DEFAULT_CONFIG: dict = {
    "model": {"dtype": "float32"},
    "scheduling": {"max_pending_requests": MAX_PENDING, "pd_mode": "disaggregated"},
    "speculation": {"enabled": False},
    "kv_cache": {"num_blocks": 512},
    "server": {"admin_token": ADMIN_TOKEN},
}


class AppManager:
    """Runs one app at a time on one Ray cluster; asking for a different config redeploys.

    Tests that need their own settings (two decode replicas, a small KV budget, ...) call
    `apps.get({...overrides...})`; the cluster stays up, only Serve and the singleton
    actors restart (~20 s), so keep such tests grouped in one module.
    """

    def __init__(self) -> None:
        self.current: LiveApp | None = None
        self.current_key: str | None = None

    def get(self, overrides: dict | None = None) -> LiveApp:
        import json

        from deployments.launch import run_app, stop_app

        data = _merge(DEFAULT_CONFIG, overrides or {})
        key = json.dumps(data, sort_keys=True)
        if self.current is not None and key == self.current_key:
            return self.current
        if self.current is not None:
            stop_app()
        port = free_port("127.0.0.1")
        config = InferosConfig.model_validate(_merge(data, {"server": {"port": port}}))
        url = run_app(config, timeout_s=600)
        self.current, self.current_key = LiveApp(url, config), key
        return self.current


@pytest.fixture(scope="session")
def apps() -> Iterator[AppManager]:
    from deployments.launch import shutdown

    manager = AppManager()
    try:
        yield manager
    finally:
        shutdown()


@pytest.fixture
def app(apps: AppManager) -> LiveApp:
    """The app with the default test config (started on first use, shared)."""
    return apps.get()
