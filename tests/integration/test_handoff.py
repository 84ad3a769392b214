"""Prefill → kv_store → decode handoff, and greedy equality with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.models.pull import ensure_default_model
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon who learns to read."}]


def _hf_greedy(messages: list[dict], num_tokens: int) -> tuple[list[int], str]:
    folder = ensure_default_model(progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=num_tokens,
            do_sample=False,
            min_new_tokens=num_tokens,
        )
    new = out[0, len(ids) :].tolist()
    return ids, tok.decode(new, skip_special_tokens=True)


def test_greedy_output_equals_transformers_and_kv_crossed_the_store(app) -> None:
    prompt_ids, expected = _hf_greedy(PROMPT, 32)
    client = app.client()
    resp = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=32,
        temperature=0,
        extra_body={"min_tokens": 32},
    )
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == 32
    assert resp.choices[0].message.content == expected

    # The prompt's forward pass ran on the prefill replica, its blocks sat in the store,
    # and the decode replica took them from there.
    entry = app.kv_store().lookup.remote(f"kv-{resp.id}")
    import ray

    entry = ray.get(entry)
    assert entry is not None, "the prompt's KV never reached the kv_store"
    snapshot = ray.get(app.scheduler().snapshot.remote())
    assert entry["producer"] in snapshot["prefill"]
    assert entry["consumers"] and all(c in snapshot["decode"] for c in entry["consumers"])
    assert entry["num_tokens"] == len(prompt_ids)
    block_size = app.config.kv_cache.block_size
    assert entry["num_blocks"] == -(-len(prompt_ids) // block_size)

    prefill_stats = app.deployment("prefill").stats.remote().result()
    decode_stats = app.deployment("decode").stats.remote().result()
    assert prefill_stats["num_prefills"] >= 1
    assert decode_stats["num_imported"] >= 1
    assert prefill_stats["pid"] != decode_stats["pid"], "prefill and decode share a process"


def test_streaming_matches_non_streaming(app) -> None:
    client = app.client()
    kwargs = dict(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    parts, usage, reasons = [], None, []
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens > 0
    assert reasons == ["length"] or reasons == ["stop"]
