"""Builds the Serve application graph: ingress → (prefill, decode), with the scheduler
and kv_store actors created on first use."""

from __future__ import annotations

import os

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.decode import DecodeDeployment
from deployments.draft import DraftDeployment
from deployments.ingress import IngressDeployment
from deployments.prefill import PrefillDeployment
from serving.backends.placement import one_engine_per_node, placement_options
from serving.backends.vllm_env import vllm_runtime_env
from serving.config import InferosConfig, RoleSettings

APP_NAME = "inferos"
PINNED_ROUTER = RequestRouterConfig(request_router_class="deployments.router.PinnedReplicaRouter")


def actor_options(
    role: RoleSettings, threads: int, name: str = "", cluster: dict[str, float] | None = None
) -> dict:
    # devices the running cluster lacks are dropped (CPU fallback, logged): serving.backends
    options, _ = placement_options(name, role, cluster)
    if role.backend == "vllm":  # vLLM's own venv and settings
        return options | {"runtime_env": vllm_runtime_env(threads)}
    return options | {
        # OpenMP reads this at start-up, before our torch.set_num_threads runs.
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
    }


def replicas(role: RoleSettings) -> dict:
    """Serve's replica settings: a fixed count, or autoscaling passed through as given."""
    if role.autoscaling_config is not None:
        return {"num_replicas": "auto", "autoscaling_config": role.autoscaling_config}
    return {"num_replicas": role.num_replicas}


def build_app(config: InferosConfig, direct_http: bool = False) -> Application:
    """`direct_http`: the ingress replicas serve `server.host:port` themselves
    (`deployments/direct_http.py`); only `launch.run_app` asks for it, on a cluster it started
    and with Serve's proxy moved off that port (`serve run`/KubeRay keep the proxy there)."""
    # NOTE: thread counts assume replicas land on a node like this one (the driver's).
    cpus = os.cpu_count() or 1
    cluster = ray.cluster_resources() if ray.is_initialized() else None
    num_nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else 1
    config = one_engine_per_node(config, num_nodes)
    cfg = config.model_dump()
    # Serve polls a stopping replica for requests still running every wait-loop period (2 s by
    # default), so an idle replica took 2 s to stop, one deployment after the other
    common = {
        "graceful_shutdown_timeout_s": 2,
        "graceful_shutdown_wait_loop_s": 0.2,
        "health_check_period_s": 5,
    }
    prefill = None  # none where one engine serves the node: decode prefills itself
    if config.has_prefill_replicas:
        prefill = PrefillDeployment.options(
            **replicas(config.prefill),
            ray_actor_options=actor_options(
                config.prefill, config.threads_for("prefill", cpus), "prefill", cluster
            ),
            request_router_config=PINNED_ROUTER,
            max_ongoing_requests=1024,
            **common,
        ).bind(cfg)
    draft = None
    if config.speculation.placement == "deployment":
        draft = DraftDeployment.options(
            ray_actor_options=actor_options(config.decode, 1), **common
        ).bind(cfg)
    decode = DecodeDeployment.options(
        **replicas(config.decode),
        ray_actor_options=actor_options(
            config.decode, config.threads_for("decode", cpus), "decode", cluster
        ),
        request_router_config=PINNED_ROUTER,
        max_ongoing_requests=4096,
        **common,
    ).bind(cfg, draft)
    return IngressDeployment.options(
        **replicas(config.ingress),
        ray_actor_options=actor_options(config.ingress, config.threads_for("ingress", cpus)),
        max_ongoing_requests=4096,
        **common,
    ).bind(prefill, decode, cfg, direct_http)
