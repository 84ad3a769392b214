"""Map the `--model` a user gives to a local Hugging Face folder.

Serving never talks to the Hub, so a model is the bundled default, a llama.cpp GGUF file
(both converted offline into the cache by `serving.models.pull`) or a folder already on
disk; anything else fails early and says why.
"""

from __future__ import annotations

from pathlib import Path

from serving.env import DEFAULT_MODEL_NAME, default_model_dir

# Names that mean "the bundled default", including the Hub id people habitually type.
DEFAULT_ALIASES = frozenset({"default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"})


def resolve_model_path(model: str | None) -> Path:
    """Folder to load `model` from; converts the default model or a `.gguf` file on first use.

    Aliases win over a same-named relative folder: `./default` must be written with its `./`.
    """
    if model is None or model in DEFAULT_ALIASES:
        # lazy: pulls in torch/transformers
        from serving.models.pull import ensure_default_model, is_converted

        # quiet when there is nothing to do: every replica resolves the model at start
        return ensure_default_model(progress=not is_converted(default_model_dir()))
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        from serving.models.pull import (
            ensure_gguf_model,
            gguf_model_dir,
            gguf_source_key,
            is_converted,
        )

        if not path.is_file():
            raise FileNotFoundError(f"model {model!r}: no such GGUF file {path}")
        # quiet when there is nothing to do: every replica resolves the model at start
        done = is_converted(gguf_model_dir(path), gguf_source_key(path))
        return ensure_gguf_model(path, progress=not done)
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r}: no such folder {path} (use 'default' for {DEFAULT_MODEL_NAME}, "
            "a local Hugging Face folder or a .gguf file; the Hub is never contacted)"
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r}: {path} is a file, expected a model folder or a .gguf file"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r}: folder {path} has no config.json, so it is not a Hugging Face "
            "model folder"
        )
    return path.resolve()


def served_model_name(path: Path) -> str:
    """Name the API reports for a model folder: its folder name."""
    return Path(path).resolve().name
