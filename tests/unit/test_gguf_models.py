"""`--model FILE.gguf`: any llama.cpp GGUF of a supported architecture converts once into
the model cache (the default model's conversion, generalised), keyed by the file's size
and mtime; a missing file or an architecture we don't run fails before anything starts.

Like tests/unit/test_pull.py these use the real `$INFEROS_HOME`: the bundled GGUF's
conversion (~20 s) is then made once per machine, not once per run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from serving.cli import main
from serving.models.hf_folder import resolve_model_path, served_model_name
from serving.models.pull import (
    MARKER,
    ensure_default_model,
    ensure_gguf_model,
    gguf_location,
    gguf_model_dir,
    gguf_source_key,
    is_converted,
)

BUNDLED_NAME = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def bundled() -> Path:
    gguf_dir, gguf_file = gguf_location(install=False)
    return gguf_dir / gguf_file


@pytest.fixture(scope="module")
def converted(bundled: Path) -> Path:
    return ensure_gguf_model(bundled, progress=False)


def _tiny_gguf(path: Path, architecture: str) -> Path:
    """A metadata-only GGUF (one zero tensor) of `architecture`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_feed_forward_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bundled_gguf_converts_through_the_generic_path(bundled: Path, converted: Path) -> None:
    """The same file as the default model's source gives the same folder contents."""
    import json

    from transformers import AutoTokenizer

    assert converted == gguf_model_dir(bundled)
    assert served_model_name(converted) == BUNDLED_NAME
    assert is_converted(converted, gguf_source_key(bundled))
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(converted).chat_template
    default = ensure_default_model(progress=False)
    assert config == json.loads((default / "config.json").read_text())
    ours, theirs = (
        load_file(converted / "model.safetensors"),
        load_file(default / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours)


def test_model_path_resolves_a_gguf_once(bundled: Path, converted: Path, tmp_path: Path) -> None:
    marker = converted / MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model_path(str(bundled)) == converted
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == before
    assert not is_converted(converted, "size=0,mtime_ns=0")  # another file there: stale
    # the key follows the file's size and mtime
    other = tmp_path / "x.gguf"
    other.write_bytes(b"GGUF")
    key = gguf_source_key(other)
    os.utime(other, ns=(0, 10**9))
    assert gguf_source_key(other) != key
    assert gguf_model_dir(other) != gguf_model_dir(bundled)
    assert gguf_model_dir(other).name == "x"


@pytest.mark.parametrize(
    ("architecture", "why"),
    [("gpt2", "architecture 'gpt2' is not supported"), ("rwkv6", "not a GGUF we can convert")],
)
def test_unsupported_gguf_fails_with_the_supported_list(
    tmp_path: Path, architecture: str, why: str
) -> None:
    path = _tiny_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture)
    with pytest.raises(ValueError, match=f"{why}.*'bloom', 'llama', 'mistral', 'qwen2', 'qwen3'"):
        resolve_model_path(str(path))
    assert not gguf_model_dir(path).exists()  # refused before converting


def test_serve_refuses_a_missing_or_unsupported_gguf(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--dry-run", "--model", str(tmp_path / "missing.gguf")]) == 1
    assert "no such GGUF file" in capsys.readouterr().err
    bad = _tiny_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    assert main(["serve", "--dry-run", "--model", str(bad)]) == 1
    assert "'gpt2' is not supported" in capsys.readouterr().err


def test_serve_dry_run_takes_a_gguf(bundled: Path, converted: Path, capsys) -> None:
    assert main(["serve", "--dry-run", "--model", str(bundled)]) == 0
    assert "fits" in capsys.readouterr().out
