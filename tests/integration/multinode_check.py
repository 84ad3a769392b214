"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and
two worker raylets, one with a `gpu_node` resource standing for a GPU node, one with
`npu_node` for an NPU node), the app placed across it by its config: prefill on the "GPU"
node, decode on the "NPU" node, so every prompt's KV crosses nodes through the object
store. Then the decode node is removed under load and another one added: the app must
serve again. Run by tests/integration/test_multinode.py in its own process (it needs its
own Ray cluster); prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import ray
from openai import OpenAI
from ray import serve
from ray.cluster_utils import Cluster

from deployments.app import APP_NAME
from deployments.direct_http import free_port
from deployments.launch import close_local_cluster, run_app, shutdown, wait_healthy
from serving.config import InferosConfig

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


def node_of(deployment: str) -> str:
    stats = serve.get_deployment_handle(deployment, app_name=APP_NAME).stats.remote().result()
    return stats["node_id"]


def generate(client: OpenAI, n: int = 16) -> str:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0)
    return out.choices[0].text


def wait_serving(client: OpenAI, url: str, timeout_s: float) -> float:
    """Seconds until /health is 200 and a request succeeds."""
    started = time.monotonic()
    while True:
        wait_healthy(url, timeout_s - (time.monotonic() - started))
        try:
            generate(client, 2)
            return time.monotonic() - started
        except Exception:
            time.sleep(1)  # healthy, but the new replica was not routable yet


def main() -> dict:
    close_local_cluster()  # loopback and token auth, as `inferos serve` starts clusters
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, resources={"gpu_node": 1})
    npu = cluster.add_node(num_cpus=1, resources={"npu_node": 1})
    ray.init(address=cluster.address, namespace="inferos")
    config = InferosConfig.model_validate(
        {
            "model": {"dtype": "float32"},
            "scheduling": {"pd_mode": "disaggregated"},
            "speculation": {"enabled": False},
            "kv_cache": {"num_blocks": 256},
            "prefill": {"resources": {"gpu_node": 1}, "torch_threads": 1},
            "decode": {"resources": {"npu_node": 1}, "torch_threads": 1},
            "server": {"port": free_port("127.0.0.1")},
        }
    )
    result: dict = {"nodes": len(ray.nodes())}
    try:
        url = run_app(config, timeout_s=600)
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        gpu_node = [n["NodeID"] for n in ray.nodes() if "gpu_node" in n["Resources"]][0]
        result["prefill_on_gpu_node"] = node_of("prefill") == gpu_node
        result["decode_on_npu_node"] = node_of("decode") == npu.node_id
        result["text"] = generate(client)
        decode = serve.get_deployment_handle("decode", app_name=APP_NAME)
        result["kv_imports"] = decode.stats.remote().result()["num_imported"]

        # under load: four streams running when the decode node goes away
        outcomes: list[str] = []

        def stream(i: int) -> None:
            try:
                for _ in client.completions.create(
                    model=MODEL, prompt=f"Story {i}:", max_tokens=200, stream=True,
                    extra_body={"ignore_eos": True},
                ):  # fmt: skip
                    pass
                outcomes.append("completed")
            except Exception as e:
                outcomes.append(type(e).__name__)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        cluster.remove_node(npu)
        removed = time.monotonic()
        cluster.add_node(num_cpus=1, resources={"npu_node": 1})
        result["recovered_s"] = wait_serving(client, url, timeout_s=300)
        result["recovered_after_removal_s"] = time.monotonic() - removed
        for t in threads:
            t.join(120)
        result["streams"] = outcomes
        result["text_after"] = generate(client)
    finally:
        shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    os.environ.setdefault("INFEROS_RAY_LOG_TO_DRIVER", "0")
    out = main()
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
