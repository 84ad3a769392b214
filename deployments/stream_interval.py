"""How many engine steps a decode replica holds a request's tokens before streaming them
(`scheduling.stream_interval`, vLLM's --stream-interval).

Every streamed chunk crosses the hops behind the engine: the decode replica's queue to the
ingress, one SSE event per request in the ingress and one ASGI message per event through
Serve's proxy, all on the same CPU cores as the engine. Per token that is cheap for a few
streams and a tax at 32 (AMX Xeon, 2 vCPU, `vllm bench serve` at c=32, 128 in / 128 out:
323 output tok/s streaming every step, 359 every 8). So unless the operator sets it, the
interval follows the batch: every step up to 7 running sequences (a single stream sees
each token as it is made), then one step more per 4 sequences, at most 8.
"""

from __future__ import annotations

AUTO_MAX_STEPS = 8
SEQUENCES_PER_STEP = 4


def stream_interval(configured: int | None, running: int) -> int:
    """Steps per chunk: `configured` where set, else by the `running` sequences."""
    if configured is not None:
        return configured
    return max(1, min(AUTO_MAX_STEPS, running // SEQUENCES_PER_STEP))
