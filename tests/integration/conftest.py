"""One real local Ray cluster running the real app with the real default model, shared by
every integration test (starting it costs ~30 s on a 2-core box)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import ray
from openai import OpenAI
from ray import serve

from deployments.actors import KV_STORE_NAME, NAMESPACE, SCHEDULER_NAME
from deployments.app import APP_NAME
from serving.config import InferosConfig

MODEL = "SmolLM2-135M-Instruct"
# Few enough in-flight requests that a test can saturate the ingress on purpose.
MAX_PENDING = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def app() -> Iterator[LiveApp]:
    from deployments.launch import run_app, shutdown

    # fp32 weights so greedy output can be compared token for token with transformers.
    config = InferosConfig.model_validate(
        {
            "model": {"dtype": "float32"},
            "server": {"port": _free_port()},
            "scheduling": {"max_pending_requests": MAX_PENDING},
            "kv_cache": {"num_blocks": 512},
        }
    )
    url = run_app(config, timeout_s=600)
    try:
        yield LiveApp(url, config)
    finally:
        shutdown()
