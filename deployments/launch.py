"""Start a local Ray cluster (or join RAY_ADDRESS), run the app, wait until it answers.

Used by `inferos serve` and by the integration tests, so both exercise the same path.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import httpx
import ray
from ray import serve
from ray._private import ray_constants

from deployments.actors import NAMESPACE, kill_singletons
from deployments.app import APP_NAME, build_app
from deployments.direct_http import bind_socket, free_port
from serving.config import InferosConfig
from serving.env import ray_address
from serving.models.hf_folder import resolve_model_path

logger = logging.getLogger(__name__)
ENABLE_CLUSTERS_ENV = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def start_ray(num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    # Ray starts workers at nice 15 by default; replicas are the serving hot path, and a
    # benchmark client or a co-located vLLM would otherwise take the CPU from them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = ray_address()
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init_ray(address, num_cpus)
    finally:  # ray.init replaced it with one that sys.exit()s (serving/stop_signal.py)
        if callable(caller_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, caller_sigterm)


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    if address:
        ray.init(address=address, namespace=NAMESPACE)
    else:
        close_local_cluster()
        ray.init(
            num_cpus=num_cpus or max(os.cpu_count() or 2, 2),
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=os.environ.get("INFEROS_RAY_LOG_TO_DRIVER", "1") == "1",
        )


def close_local_cluster() -> None:
    """The local cluster we start is for this machine only: every Ray server (GCS, raylet,
    workers, agents) listens on 127.0.0.1 instead of all interfaces, and Ray's token
    authentication is on (a token in ~/.ray/auth_token, created on first use).

    Ray binds its gRPC servers to loopback only when the node's IP is 127.0.0.1, and it
    resolves "127.0.0.1" to the machine's address unless clusters are "disabled", as on
    macOS; so disable them for Ray's code in this process (read at import) and in the
    processes it starts (read from the environment). A multi-node cluster is started with
    `ray start` and joined through RAY_ADDRESS, which this never touches (README: Security).
    """
    os.environ[ENABLE_CLUSTERS_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray (2.52+) turns token authentication on by default for a cluster ray.init starts;
    # setting RAY_AUTH_MODE here would skip its set-up (it respects an explicit mode as is)
    if os.environ.get(AUTH_MODE_ENV, "token").lower() != "token":
        logger.warning(
            "%s=%s: Ray's token authentication is off; any local user can run code in "
            "this cluster", AUTH_MODE_ENV, os.environ[AUTH_MODE_ENV],
        )  # fmt: skip


def run_app(config: InferosConfig, timeout_s: float = 600.0) -> str:
    """Deploy the app and block until /health answers 200; returns the base URL."""
    resolve_model_path(config.model.path)  # convert the default model once, before replicas race
    start_ray()
    host, port = config.server.host, config.server.port
    direct = serves_direct_http(config)
    if direct:  # the ingress replicas take host:port; Serve's proxy wants a port all the same
        bind_socket(host, port, share=False).close()  # a taken port fails here, not in replicas
        proxy_port = free_port(host)
        logger.info("ingress replicas serve %s:%d; Serve's proxy is on %d", host, port, proxy_port)
    serve.start(http_options={"host": host, "port": proxy_port if direct else port})
    app = build_app(config, direct_http=direct)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    wait_healthy(url, timeout_s)
    return url


def serves_direct_http(config: InferosConfig) -> bool:
    """Whether the ingress replicas answer server.host:port themselves (deployments/direct_http):
    asked for, on the local cluster we start (with RAY_ADDRESS, replicas and clients may be on
    other nodes), and with a fixed ingress replica count (Serve's autoscaler would see none of
    the requests that skip its proxy, and scale the ingress down)."""
    if not config.server.direct_http or ray_address():
        return False
    if config.ingress.autoscaling_config is not None:
        logger.warning("server.direct_http is off: ingress.autoscaling_config is set")
        return False
    return True


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/health not ready after {timeout_s:.0f}s (last: {last})")


def stop_app() -> None:
    """Remove Serve and the singleton actors but keep the Ray cluster (tests redeploy)."""
    try:
        serve.shutdown()
    finally:
        kill_singletons()


def shutdown() -> None:
    try:
        stop_app()
    finally:
        ray.shutdown()
