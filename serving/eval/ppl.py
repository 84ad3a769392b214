"""Streaming perplexity and KL divergence of staged-KV profiles against `baseline`.

The text is cut into windows of `context` tokens, each evaluated as one fresh sequence. A
window is fed in chunks of `chunk` tokens through the engine's own model and paged
attention; after each chunk the cache is restaged (`StagedCache.restage`), so every chunk
attends to the earlier chunks as the engine's decode would see them: demoted units hold
`dequantize(quantize(unit))`, the rest their exact values. With `chunk` dividing the unit
size and the recent window (`auto_chunk`), a unit is demoted at the same token as in decode
and every token sees exactly the staged cache decode would show it.

Per profile: perplexity over every predicted token, mean KL(baseline || profile) of the
next-token distributions at the same positions, and the KV bytes per token the engine
would hold for a sequence of `context` tokens (at the end of each window; with `context` a
multiple of the unit size no unit is partly filled then, so
`kv_bytes_per_token_decode_mean` also averages over the second half of each window).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from policies.kv_levels import BASELINE, Profile
from serving.eval.importance import AttentionMassProbe
from serving.eval.staged_cache import StagedCache
from serving.models.attention import AttentionMetadata
from serving.models.llama import LlamaForCausalLM


@dataclass(slots=True)
class EvalSettings:
    context: int = 2048
    chunk: int = 0  # 0: `auto_chunk` of the evaluated profiles
    pressure: float = 1.0  # KV pool used fraction the policy sees; 1.0 = budget exhausted
    importance: str = "none"  # "none": every unit average; "attention": mass received


@dataclass(slots=True)
class ProfileTally:
    nll_sum: float = 0.0
    kld_sum: float = 0.0
    num_tokens: int = 0
    bytes_sum: int = 0  # KV bytes at the end of each window
    tokens_at_end: int = 0
    decode_samples: list[float] = field(default_factory=list)
    level_tokens: dict[str, int] = field(default_factory=dict)


def _forward_window(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    cache: StagedCache,
    settings: EvalSettings,
    probe: AttentionMassProbe | None,
) -> torch.Tensor:
    """Log-probs `[n - 1, vocab]` of tokens 1..n-1 of `ids [n]`, chunk by chunk."""
    n = ids.shape[0]
    out = []
    for start in range(0, n, settings.chunk):
        end = min(n, start + settings.chunk)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(start, end),
            block_tables=cache.block_table[None],
            context_lens=torch.tensor([end]),
            query_lens=[end - start],
            context_lens_list=[end],
            all_decode=end - start == 1,
        )
        _sample_decode_bytes(cache, start, end, n)
        hidden = model(ids[start:end], torch.arange(start, end), cache.kv, meta)
        if probe is not None:
            probe.publish(end)
        out.append(torch.log_softmax(model.compute_logits(hidden), dim=-1))  # [c, vocab]
        cache.restage(end, settings.pressure)
    return torch.cat(out)[:-1]  # the window's last token has nothing to predict


def _sample_decode_bytes(cache: StagedCache, start: int, end: int, n: int) -> None:
    """Bytes/token a decode would hold at each length p in [start, end) of the window's
    second half: the units staged at `start`, plus p - start new tokens at L0 (no unit
    completes inside a chunk, so decode would not demote anything there either)."""
    held = cache.num_bytes(start)
    for p in range(max(start, 1, -(-n // 2)), end):
        cache.bytes_per_token_samples.append((held + (p - start) * cache.token_bytes) / p)


def auto_chunk(profiles: list[Profile], cap: int = 128) -> int:
    """Largest chunk (<= cap) dividing every unit size and recent window: restaging only at
    chunk ends then demotes each unit at the same token as decode's per-step restaging."""
    chunk = cap
    for p in profiles:
        for n in (p.quant_group_tokens, p.recent_window_tokens):
            if n:
                chunk = math.gcd(chunk, n)
    return chunk


def _new_cache(model: LlamaForCausalLM, n: int, profile: Profile) -> StagedCache:
    arch = model.arch
    dtype = model.embed_tokens.weight.dtype
    return StagedCache(arch.num_layers, arch.num_kv_heads, arch.head_dim, n, dtype, profile)


def evaluate(
    model: LlamaForCausalLM,
    token_ids: list[int],
    profiles: list[Profile],
    settings: EvalSettings,
    progress=None,
) -> dict[str, dict]:
    """Run `baseline` and `profiles` over `token_ids`; one result dict per profile name."""
    if settings.chunk < 0 or settings.context < 2:
        raise ValueError("chunk must be >= 0 and context >= 2")
    if settings.chunk == 0:
        settings = dataclasses.replace(settings, chunk=auto_chunk(profiles))
    ids = torch.tensor(token_ids, dtype=torch.long)
    windows = [ids[s : s + settings.context] for s in range(0, len(ids), settings.context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("the text has fewer than 2 tokens")
    others = [p for p in profiles if p.name != BASELINE.name]
    tallies = {p.name: ProfileTally() for p in [BASELINE, *others]}
    for w, window in enumerate(windows):
        targets = window[1:]
        base_cache = _new_cache(model, len(window), BASELINE)
        base = _forward_window(model, window, base_cache, settings, None)  # [n-1, vocab]
        _tally(tallies[BASELINE.name], base, base, targets, base_cache, len(window))
        for profile in others:
            cache = _new_cache(model, len(window), profile)
            probe = AttentionMassProbe(model, cache) if settings.importance == "attention" else None
            try:
                logp = _forward_window(model, window, cache, settings, probe)
            finally:
                if probe is not None:
                    probe.close()
            _tally(tallies[profile.name], logp, base, targets, cache, len(window))
        if progress is not None:
            progress(w + 1, len(windows), tallies)
    return {
        name: _result(name, t, tallies[BASELINE.name], settings, model)
        for name, t in tallies.items()
        if name in {p.name for p in profiles}
    }


def _tally(
    t: ProfileTally,
    logp: torch.Tensor,
    base: torch.Tensor,
    targets: torch.Tensor,
    cache: StagedCache,
    n: int,
) -> None:
    t.nll_sum -= float(logp.gather(1, targets[:, None]).sum())
    t.kld_sum += float((base.exp() * (base - logp)).sum())  # KL(baseline || profile)
    t.num_tokens += targets.shape[0]
    t.bytes_sum += cache.num_bytes(n)
    t.tokens_at_end += n
    t.decode_samples.extend(cache.bytes_per_token_samples)
    for level, count in cache.level_tokens(n).items():
        t.level_tokens[level] = t.level_tokens.get(level, 0) + count


def _result(name: str, t: ProfileTally, base: ProfileTally, settings: EvalSettings, model) -> dict:
    arch = model.arch
    fp16_bytes = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2
    ppl = math.exp(t.nll_sum / t.num_tokens)
    base_ppl = math.exp(base.nll_sum / base.num_tokens)
    bytes_per_token = t.bytes_sum / t.tokens_at_end
    return {
        "profile": name,
        "ppl": ppl,
        "kld": t.kld_sum / t.num_tokens,
        "kv_bytes_per_token": bytes_per_token,
        "context": settings.context,
        "num_tokens": t.num_tokens,
        "baseline_ppl": base_ppl,
        "delta_ppl_pct": 100.0 * (ppl / base_ppl - 1.0),
        # mean over every sequence length in the windows' second halves: includes the
        # partly filled unit decode is writing, which the end-of-window number may not
        "kv_bytes_per_token_decode_mean": sum(t.decode_samples) / len(t.decode_samples),
        "fp16_bytes_per_token": fp16_bytes,
        "reduction_vs_fp16": fp16_bytes / bytes_per_token,
        "level_fractions": {k: v / t.tokens_at_end for k, v in t.level_tokens.items()},
        "chunk": settings.chunk,
        "pressure": settings.pressure,
        "importance": settings.importance,
    }
