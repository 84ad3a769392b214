"""`--model PATH` serves any Llama-family folder: our model matches transformers' logits on
tiny randomly initialised Llama-3 (rope scaling), Qwen2 (q/k/v bias) and Mistral folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.models.loader import load_model

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CASES = {
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_theta=1000000.0, tie_word_embeddings=True),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
    ),
}


@pytest.fixture(params=sorted(CASES))
def tiny_folder(request, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = config_cls(**TINY, **extra)
    model = model_cls(config).eval()
    if request.param == "qwen2":  # make the biases matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model


def test_logits_match_transformers(tiny_folder) -> None:
    folder, reference = tiny_folder
    ours = load_model(folder, torch.float32)
    # 150 tokens: past the llama3 original context (64) so the scaled frequencies matter
    prompt = torch.randint(
        0, TINY["vocab_size"], (150,), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = reference(prompt[None]).logits[0]
    engine = LLMEngine(ours, EngineConfig(num_blocks=32, block_size=16, max_model_len=256), ())
    seq = Sequence("a", prompt.tolist(), SamplingParams(max_tokens=1, temperature=0))
    engine.add_request(seq)
    batch = engine.scheduler.schedule()
    inputs, positions, meta = engine.runner._prepare(batch)
    with torch.inference_mode():
        logits = ours.compute_logits(ours(inputs, positions, engine.runner.kv_cache, meta))
    assert (logits - expected).abs().max().item() < 1e-3


def test_greedy_generation_matches_transformers(tiny_folder) -> None:
    folder, reference = tiny_folder
    ours = load_model(folder, torch.float32)
    prompt = list(range(5, 45))
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            min_new_tokens=12,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    engine = LLMEngine(ours, EngineConfig(num_blocks=32, block_size=16, max_model_len=256), ())
    engine.add_request(Sequence("a", prompt, SamplingParams(max_tokens=12, temperature=0)))
    got: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            got.extend(out.new_token_ids)
    assert got == expected
