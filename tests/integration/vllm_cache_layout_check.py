"""Runs in `.venv-vllm`: for each CPU attention ISA vLLM's x86 build has, random K/V are
written with vLLM's own cache-write op and read back with our connector's gather.

    .venv-vllm/bin/python tests/integration/vllm_cache_layout_check.py

Prints `INFEROS-RESULT {json}`: the ISA vLLM picks on this CPU, which library vLLM loaded
for it, and per case whether the tokens read back equal the tokens written, or that this
library has no kernel for that ISA (vLLM's AVX2 and AVX-512 builds have no "amx"; its
AVX-512-BF16 build, which has, cannot even be loaded on a CPU without AVX-512: SIGILL).
tests/integration/test_vllm_cache_layout.py judges it; nothing is asserted here.
"""

from __future__ import annotations

import json

import torch

# (isa, block size, kv heads, head dim): the default model's shape (3 x 64) at vLLM's
# block size for our prefill (32), plus a wider head and vec16's smaller blocks
CASES = [
    ("vec", 32, 3, 64),
    ("amx", 32, 3, 64),
    ("amx", 64, 2, 128),
    ("vec", 64, 2, 128),
    ("vec16", 16, 3, 64),
    ("vec16", 32, 3, 64),
]
NUM_BLOCKS = 6
# what vLLM's cache-write op raises for an ISA its loaded library was built without
UNSUPPORTED = "Unsupported CPU attention configuration"


def check(isa: str, block_size: int, num_kv_heads: int, head_dim: int) -> dict:
    from vllm import _custom_ops as ops

    from serving.backends.vllm.cache_layout import gather_block_tokens, probe_block_layout

    gen = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, num_kv_heads, block_size, 2 * head_dim)
    cache = torch.randn(shape, generator=gen).to(torch.bfloat16)  # stale data around
    key_cache, value_cache = cache.view(NUM_BLOCKS, num_kv_heads, 2 * block_size, head_dim).chunk(
        2, dim=2
    )
    # a prompt that ends inside its last block, in blocks that are neither first nor sorted
    block_ids = [4, 1, 3]
    num_tokens = 2 * block_size + 5
    slots = torch.tensor(
        [block_ids[t // block_size] * block_size + t % block_size for t in range(num_tokens)]
    )
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    case = {"isa": isa, "block_size": block_size, "num_kv_heads": num_kv_heads}
    case["head_dim"] = head_dim
    try:
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    except RuntimeError as e:
        if UNSUPPORTED not in str(e):
            raise
        return case | {"built": False, "error": str(e)}
    layout = probe_block_layout(isa, num_kv_heads, block_size, head_dim, torch.bfloat16)
    got_k, got_v = gather_block_tokens(cache, layout, block_ids, num_tokens)
    return case | {
        "built": True,
        "keys_equal": torch.equal(got_k, k),
        "values_equal": torch.equal(got_v, v),
    }


def main() -> None:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    result = {
        "machine_isa": _get_attn_isa(torch.bfloat16, 32, 64),
        # the library vLLM loads for this CPU (vllm/platforms/cpu.py, import_kernels)
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "cases": [check(*case) for case in CASES],
    }
    print("INFEROS-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
