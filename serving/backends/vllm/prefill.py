"""Prefill on vLLM: the first token from vLLM, the prompt's KV in our block format.

`VllmPrefill(model_path)` runs a `vllm.LLM` in this process (engine core in-process, so
our connector's `SAVED` is readable here) with `InferosStoreConnector` as its KV
connector; `prefill(prompt_ids)` returns the greedy first token and a `KVPayload` any of
our decode backends imports.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from serving.engine.sampling_params import SamplingParams as OurSamplingParams
from serving.kv.block_format import KVLayout, KVPayload


def to_payload(
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]], num_tokens: int, block_size: int
) -> KVPayload:
    """Per-layer K, V `[n, Hkv, D]` → blocks `[L, 2, block_size, Hkv, D]`."""
    layers = [torch.stack(saved[i]) for i in range(len(saved))]  # [2, n, H, D] each
    kv = torch.stack(layers)  # [L, 2, n, H, D]
    num_layers, _, n, num_kv_heads, head_dim = kv.shape
    assert n == num_tokens, (n, num_tokens)
    pad = -n % block_size
    if pad:
        kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, pad))
    blocks = list(kv.split(block_size, dim=2))
    layout = KVLayout(
        num_layers, num_kv_heads, head_dim, block_size, str(kv.dtype).removeprefix("torch.")
    )
    return KVPayload(layout, num_tokens, [b.contiguous() for b in blocks])


class VllmPrefill:
    def __init__(
        self,
        model_path: Path,
        block_size: int,
        max_model_len: int = 2048,
        vllm_block_size: int = 32,
        **llm_kwargs,
    ):
        # our connector hands KV over in-process: keep vLLM's engine core in this process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.config import KVTransferConfig

        self.block_size = block_size
        self.llm = LLM(
            model=str(model_path),
            dtype="bfloat16",  # vLLM's CPU kernels: bf16 (fp32 attention is not built)
            max_model_len=max_model_len,
            block_size=vllm_block_size,
            enforce_eager=True,
            kv_transfer_config=KVTransferConfig(
                kv_connector="InferosStoreConnector",
                kv_connector_module_path="serving.backends.vllm.connector",
                kv_role="kv_producer",
            ),
            **llm_kwargs,
        )

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """vLLM alone, greedy: the reference a handed-over sequence must match."""
        from vllm import SamplingParams, TokensPrompt

        from serving.backends.vllm.connector import SAVED

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        (out,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False
        )
        SAVED.clear()
        return list(out.outputs[0].token_ids)

    def prefill(
        self, prompt_ids: list[int], params: OurSamplingParams | None = None
    ) -> tuple[int, KVPayload]:
        """First token (sampled by vLLM with `params`, greedy by default) and the prompt's KV."""
        from vllm import TokensPrompt

        from serving.backends.vllm.connector import SAVED

        SAVED.clear()
        (out,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt_ids)], _vllm_params(params), use_tqdm=False
        )
        if len(SAVED) != 1:
            raise RuntimeError(f"expected one request's KV from the connector, got {len(SAVED)}")
        saved = SAVED.popitem()[1]
        return out.outputs[0].token_ids[0], to_payload(saved, len(prompt_ids), self.block_size)


def _vllm_params(params: OurSamplingParams | None):
    """Our first-token sampling settings as vLLM's (stop conditions stay ours)."""
    from vllm import SamplingParams

    if params is None:
        return SamplingParams(max_tokens=1, temperature=0.0)
    # the same semantics as ours (`serving.engine.logits_processors` follows vLLM's)
    controls = dict(
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias) or None,
    )
    if params.greedy:
        return SamplingParams(max_tokens=1, temperature=0.0, **controls)
    return SamplingParams(
        max_tokens=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        min_p=params.min_p,
        seed=params.seed,
        **controls,
    )
