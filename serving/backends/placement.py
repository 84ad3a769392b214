"""Per-role device settings → Ray `ray_actor_options`, fitted to the cluster at hand.

A config written for a cluster (prefill on `num_gpus: 1`, decode on `resources: {NPU: 1}`,
an `accelerator_type`) must still start on a laptop or CI box: asking Ray for a resource no
node has leaves the replica pending forever. So whatever the running cluster lacks is
dropped, the replica runs on CPU, and each fallback is logged at start. Pure: the cluster's
resources come in as a dict (`ray.cluster_resources()`).
"""

from __future__ import annotations

import logging

from serving.config import InferosConfig, RoleSettings

logger = logging.getLogger(__name__)

ACCELERATOR_PREFIX = "accelerator_type:"  # how Ray names a node's accelerator resource


def placement_options(
    role: str, settings: RoleSettings, cluster: dict[str, float] | None
) -> tuple[dict, list[str]]:
    """(the device part of `ray_actor_options`, fallback notes). `cluster` None = unknown
    (no Ray connection yet): the settings pass through unchanged."""
    options: dict = {
        "num_cpus": settings.num_cpus,
        "num_gpus": settings.num_gpus,
        "resources": dict(settings.resources),
    }
    if settings.accelerator_type:
        options["accelerator_type"] = settings.accelerator_type
    if cluster is None:
        return options, []
    notes: list[str] = []
    if settings.num_gpus > cluster.get("GPU", 0):
        notes.append(
            f"{role}: num_gpus={settings.num_gpus} but the cluster has "
            f"{cluster.get('GPU', 0):g} GPU; running on CPU"
        )
        options["num_gpus"] = 0
    for name, amount in settings.resources.items():
        if amount > cluster.get(name, 0):
            notes.append(
                f"{role}: resource {name}={amount:g} absent from the cluster "
                f"(has {cluster.get(name, 0):g}); running without it"
            )
            del options["resources"][name]
    accel = settings.accelerator_type
    if accel and ACCELERATOR_PREFIX + accel not in cluster:
        known = sorted(
            k.removeprefix(ACCELERATOR_PREFIX) for k in cluster if k.startswith(ACCELERATOR_PREFIX)
        )
        notes.append(f"{role}: accelerator_type {accel} not in the cluster ({known}); ignored")
        del options["accelerator_type"]
    for note in notes:
        logger.warning("placement fallback: %s", note)
    return options, notes


def _cpu_only(settings: RoleSettings) -> bool:
    return not (settings.num_gpus or settings.resources or settings.accelerator_type)


def one_engine_per_node(config: InferosConfig, num_nodes: int) -> InferosConfig:
    """`config` with no prefill replica where, in `pd_mode: auto`, prefill and decode would
    only share one node's CPU cores: two engines' OpenMP teams on the same cores stall each
    other at every barrier, and a KV hand-over between them buys nothing. The decode
    replica then prefills itself (chunked into its decode steps) with all the cores.
    Disaggregation stays where a role asks for a device or the cluster has several nodes,
    where the prefill backend is not ours, and wherever asked for (`disaggregated`)."""
    if config.scheduling.pd_mode != "auto" or num_nodes > 1:
        return config
    prefill = config.prefill
    if prefill.autoscaling_config is not None or prefill.backend != "torch":
        return config
    if not (_cpu_only(prefill) and _cpu_only(config.decode)):
        return config
    logger.info("one engine per node: CPU-only prefill and decode on one node; no prefill replica")
    return config.model_copy(update={"prefill": prefill.model_copy(update={"num_replicas": 0})})
