"""Runs in `.venv-vllm`: vLLM prefills, our torch engine decodes from the handed-over KV.

    .venv-vllm/bin/python -m serving.backends.vllm.handoff < request.json > result.json

request: {"model_path", "prompts": [[ids...]], "num_tokens", "block_size", "decode_dtype",
"kv_dtype" (optional, default decode_dtype), "int4_max_tokens" (optional, 0 = off),
"dense_kernels" (optional, as ModelSettings),
"time_prompt_tokens" (optional: also time a prefill
of that many tokens on both)}.
result: per prompt the greedy tokens of vLLM alone and of vLLM prefill → our decode, our
decode's logit gap to each of vLLM alone's tokens when fed them (`forced_gaps`) and its own
greedy pick at each of those steps (`forced_picks`), the
payload's layout, and optional prefill timings. The caller (tests/integration/
test_vllm_prefill.py, benchmarks/backend_prefill.py) judges them; nothing is asserted here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def _engine_with_import(model, engine_config, prompt: list[int], first: int, payload, n: int):
    """Our torch engine holding one sequence: the prompt's KV handed over, `first` sampled."""
    import torch

    from serving.engine.engine import LLMEngine
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence
    from serving.kv.block_format import KVPayload

    engine = LLMEngine(model, engine_config, model.arch.eos_token_ids)
    seq = Sequence(
        "handoff", list(prompt), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    )
    seq.output_token_ids = [first]
    # the torch runner imports blocks of its own dtype only: convert (vLLM's KV is bf16)
    layout = dataclasses.replace(payload.layout, dtype=engine_config.kv_dtype)
    dtype = getattr(torch, engine_config.kv_dtype)
    seq.kv_import = KVPayload(layout, payload.num_tokens, [b.to(dtype) for b in payload.blocks])
    engine.add_request(seq)
    return engine


def _decode(model, engine_config, prompt: list[int], first: int, payload, num_tokens: int):
    engine = _engine_with_import(model, engine_config, prompt, first, payload, num_tokens)
    tokens = [first]
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens[:num_tokens]


def _forced_gaps(
    model, engine_config, prompt: list[int], payload, reference: list[int]
) -> tuple[list[float], list[int]]:
    """Our decode from the handed-over KV, fed `reference` (vLLM alone's tokens) instead of
    its own picks: per decode step, how far below our top logit vLLM's next token lies, and
    our own greedy pick there. Free-running tokens stop telling anything after the first
    near-tie two bf16 kernels break differently; this checks every step.

    A gap of 0 does not mean our pick is vLLM's token: bf16 logits near 20 are 0.125 apart,
    so two tokens can tie exactly, and argmax takes the lower id. Hence the picks too."""
    import torch

    engine = _engine_with_import(
        model, engine_config, prompt, reference[0], payload, len(reference)
    )
    gaps, picks = [], []
    with torch.inference_mode():
        for token in reference[1:]:
            batch = engine.scheduler.schedule()
            plan = engine.staged.plan(batch.seqs) if engine.staged.states else None
            logits = engine.runner.execute(batch, plan, -1)[0]
            gaps.append(float(logits.max() - logits[token]))
            picks.append(int(logits.argmax()))  # the greedy sampler's rule (first max)
            # the engine's commit, with vLLM's token in place of our pick
            engine.commit(batch.seqs[0], [token], batch.num_scheduled_tokens[0])
    return gaps, picks


def _time_prefill(
    vllm_prefill, model, engine_config, num_prompt_tokens: int, repeats: int = 3
) -> dict:
    import torch

    from serving.engine.engine import LLMEngine
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"vllm_generate_s": [], "vllm_handoff_s": [], "torch_s": []}
    for r in range(repeats + 1):  # the first round warms up and is dropped
        ids = torch.randint(100, 40000, (num_prompt_tokens,), generator=gen).tolist()
        t = time.perf_counter()
        vllm_prefill.generate(ids, 1)  # vLLM alone (fresh ids: no prefix-cache hit)
        t_vllm = time.perf_counter() - t
        ids = torch.randint(100, 40000, (num_prompt_tokens,), generator=gen).tolist()
        t = time.perf_counter()
        vllm_prefill.prefill(ids)
        t_conn = time.perf_counter() - t
        engine = LLMEngine(model, engine_config, model.arch.eos_token_ids)
        engine.add_request(
            Sequence(f"t{r}", ids, SamplingParams(max_tokens=1, temperature=0.0), export_kv=True)
        )
        t = time.perf_counter()
        engine.step()
        t_torch = time.perf_counter() - t
        if r:
            out["vllm_generate_s"].append(t_vllm)
            out["vllm_handoff_s"].append(t_conn)
            out["torch_s"].append(t_torch)
    return out


def main() -> None:
    import torch

    from serving.backends.vllm.prefill import VllmPrefill
    from serving.engine.engine import EngineConfig
    from serving.models.loader import load_model

    req = json.load(sys.stdin)
    path = Path(req["model_path"])
    block_size = req.get("block_size", 16)
    dtype = req.get("decode_dtype", "bfloat16")
    started = time.perf_counter()
    vllm_prefill = VllmPrefill(path, block_size=block_size, max_model_len=2048)
    startup_s = time.perf_counter() - started
    # int4_max_tokens: the decode replica's int4 path (ModelSettings), for the same numerics
    int4 = req.get("int4_max_tokens", 0)
    measured = req.get("dense_kernels", "model_dtype") == "measured"
    model = load_model(
        path, getattr(torch, dtype), 2049, int4_max_tokens=int4, measured_dense=measured
    )
    kv_dtype = req.get("kv_dtype", dtype)
    engine_config = EngineConfig(num_blocks=256, block_size=block_size, kv_dtype=kv_dtype)
    results = []
    for prompt in req["prompts"]:
        alone = vllm_prefill.generate(prompt, req["num_tokens"])
        first, payload = vllm_prefill.prefill(prompt)
        handoff = _decode(model, engine_config, prompt, first, payload, req["num_tokens"])
        gaps, picks = _forced_gaps(model, engine_config, prompt, payload, alone)
        results.append(
            {
                "vllm": alone,
                "handoff": handoff,
                "forced_gaps": gaps,
                "forced_picks": picks,
                "num_tokens": payload.num_tokens,
                "num_blocks": payload.num_blocks,
                "layout": payload.layout.__repr__(),
            }
        )
    out = {"startup_s": startup_s, "results": results, "torch_threads": torch.get_num_threads()}
    if req.get("time_prompt_tokens"):
        out["prefill_timing"] = _time_prefill(
            vllm_prefill, model, engine_config, req["time_prompt_tokens"]
        )
    print("INFEROS-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
