"""The default model converts from the bundled GGUF to a folder transformers loads offline.

These use the real `$INFEROS_HOME` (default ~/.cache/inferos) on purpose: the conversion takes a
while on a small box, and every other test and engineer reuses the same converted folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from serving.models.hf_folder import resolve_model_path, served_model_name
from serving.models.pull import MARKER, ensure_default_model, gguf_location

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def folder() -> Path:
    return ensure_default_model(progress=False)


def test_converted_folder_matches_gguf(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template, "chat template lost in conversion"
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]

    reloaded = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert reloaded.config.eos_token_id == tokenizer.eos_token_id
    gguf_dir, gguf_file = gguf_location(install=False)
    original = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        got = reloaded(ids).logits
        want = original(ids).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-4


def test_second_call_is_noop(folder: Path) -> None:
    marker = folder / MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_default_model(progress=False) == folder
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before


def test_resolve_default_aliases(folder: Path) -> None:
    for name in (None, "default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model_path(name) == folder
    assert served_model_name(folder) == "SmolLM2-135M-Instruct"


def test_resolve_rejects_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()
