"""Builds the proposer and the `SpecDecodeStep` a decode engine runs, from the user's
`SpeculationSettings`. Model loading happens here, on the engine thread, so the draft's
OpenMP team is the engine's."""

from __future__ import annotations

import torch
from torch import nn

from serving.config import SpeculationSettings
from serving.engine.engine import LLMEngine
from serving.models.hf_folder import resolve_model_path
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import load_model
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.draft_model import DraftModelProposer
from serving.spec.proposer import NgramProposer, Proposer, TruncatedDraft


def truncated_view(model: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """The target's first `num_layers` layers + final norm + LM head, sharing its weights
    (for a draft that cannot share the target's KV cache, e.g. in another process)."""
    if not 0 < num_layers <= len(model.layers):
        raise ValueError(f"num_draft_layers must be in 1..{len(model.layers)}")
    model.layers = nn.ModuleList(list(model.layers)[:num_layers])
    return model


def load_draft_model(
    settings: SpeculationSettings,
    target_path: str | None,
    dtype: torch.dtype,
    max_positions: int,
    int4_max_tokens: int,
) -> LlamaForCausalLM:
    """The model a `DraftModelProposer` runs: the draft folder, or a truncated target."""
    if settings.method == "model":
        path = resolve_model_path(settings.draft_model)
        return load_model(path, dtype, max_positions, int4_max_tokens)
    target = load_model(resolve_model_path(target_path), dtype, max_positions, int4_max_tokens)
    return truncated_view(target, settings.num_draft_layers)


def build_proposer(
    settings: SpeculationSettings,
    engine: LLMEngine,
    target_path: str | None,
    dtype: torch.dtype,
    int4_max_tokens: int,
) -> Proposer:
    """In-process proposer next to the target engine."""
    if settings.method == "ngram":
        return NgramProposer(settings.ngram_max, settings.ngram_min)
    if settings.method == "truncated":
        return TruncatedDraft(engine.runner, settings.num_draft_layers, settings.draft_vocab_size)
    model = load_draft_model(
        settings,
        target_path,
        dtype,
        engine.config.max_model_len + settings.k_max + 1,
        int4_max_tokens,
    )
    check_vocab(model, engine.runner.model)
    return DraftModelProposer(
        model, settings.draft_num_blocks, engine.config.block_size, settings.draft_vocab_size
    )


def check_vocab(draft: LlamaForCausalLM, target: LlamaForCausalLM) -> None:
    if draft.arch.vocab_size > target.arch.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.arch.vocab_size}) is larger than the target's "
            f"({target.arch.vocab_size}): the draft must share the target's tokenizer"
        )


def build_spec_step(
    settings: SpeculationSettings, engine: LLMEngine, proposer: Proposer
) -> SpecDecodeStep:
    return SpecDecodeStep(engine, proposer, k_max=settings.k_max, enabled=settings.enabled)
