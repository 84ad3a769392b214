"""A model family other than Llama through the real app (`model.path` = a local folder):
a tiny random Qwen3 (q/k norm) with the default model's tokenizer answers two chat turns
with transformers' greedy tokens, the second turn reusing the first's KV from the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from serving.models.pull import ensure_default_model
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration

NAME = "tiny-qwen3"
NUM_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TURN1 = [{"role": "user", "content": "Write a short poem about paged attention."}]


def _build(folder: Path) -> transformers.Qwen3ForCausalLM:
    """Weights large enough that greedy choices are no near-ties; norms off 1."""
    tokenizer_folder = ensure_default_model(progress=False)
    config = transformers.Qwen3Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    model.save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_folder / file).exists():
            shutil.copy(tokenizer_folder / file, folder / file)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families") / NAME
    model = _build(folder)
    return folder, transformers.AutoTokenizer.from_pretrained(folder), model


def _hf_greedy(tiny, messages: list[dict]) -> str:
    _, tok, model = tiny
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NUM_TOKENS,
            min_new_tokens=NUM_TOKENS,
            do_sample=False,
        )
    return tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def test_qwen3_folder_serves_transformers_greedy_output(apps, tiny) -> None:
    folder = tiny[0]
    app = apps.get({"model": {"path": str(folder)}})

    def chat(messages: list[dict]):
        resp = app.client().chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=NUM_TOKENS,
            temperature=0,
            extra_body={"min_tokens": NUM_TOKENS},
            extra_headers={"X-Session-Id": "families-1"},
        )
        assert resp.usage.completion_tokens == NUM_TOKENS
        return resp.choices[0].message.content

    assert [m.id for m in app.client().models.list().data] == [NAME]
    first = chat(TURN1)
    assert first == _hf_greedy(tiny, TURN1)

    hits_before = total(app.metrics_text(), "inferos:prefix_cache_hits_total")
    turn2 = [
        *TURN1,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Now make it rhyme."},
    ]
    assert chat(turn2) == _hf_greedy(tiny, turn2)
    assert total(app.metrics_text(), "inferos:prefix_cache_hits_total") > hits_before
