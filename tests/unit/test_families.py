"""Qwen3, GPT-NeoX, GPT-J and BLOOM folders run in our engine as transformers runs them.

Per family, a tiny randomly initialised model built with transformers (norm weights and
biases randomised too, so that they matter) is saved as safetensors beside the default
model's tokenizer, loaded by `load_model`, and compared in fp32 with transformers: logits
of a two-sequence prefill, of paged decode token by token across many 4-token KV blocks
(scrambled block tables), of a chunked prefill mixed with a decode row, of short
multi-token queries over a cached context, and greedy generation of 32 tokens. Decode over
int8 KV units (staged KV) equals decode over their dequantized values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from policies.kv_levels import Level
from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.model_runner import ModelRunner
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import SchedulerOutput
from serving.engine.sequence import Sequence
from serving.engine.staged_kv import HOLE
from serving.kv.quant import dequantize_block, quantize_block
from serving.models import attention
from serving.models.families import family_for
from serving.models.loader import load_model
from tests.unit.runner_checks import all_logits, max_diff, seq_with_blocks

ATOL = 1e-3
BLOCK_SIZE = 4  # small, so that every sequence here spans many blocks
NUM_BLOCKS = 48
NUM_NEW_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)

# case → (family, config class, model class, config)
CASES = {
    "qwen3": (
        "qwen3",
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # not hidden / heads: Qwen3 sets it on its own
            max_position_embeddings=256,
            rope_theta=1000000.0,
        ),
    ),
    "qwen3_bias_tied": (
        "qwen3",
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=256,
            attention_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    "gpt_neox": (
        "gpt_neox",
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,  # rotary on 8 of each head's 16 channels
            max_position_embeddings=256,
        ),
    ),
    "gpt_neox_sequential": (
        "gpt_neox",
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            rotary_pct=0.25,
            rotary_emb_base=5000,
            use_parallel_residual=False,
            hidden_act="gelu_new",
            max_position_embeddings=256,
        ),
    ),
    "gptj": (
        "gptj",
        transformers.GPTJConfig,
        transformers.GPTJForCausalLM,
        dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
    ),
    "bloom": (
        "bloom",
        transformers.BloomConfig,
        transformers.BloomForCausalLM,
        dict(hidden_size=64, n_layer=2, n_head=4),
    ),
    "bloom_6_heads_untied": (  # 6 heads: ALiBi slopes beyond a power of two
        "bloom",
        transformers.BloomConfig,
        transformers.BloomForCausalLM,
        dict(hidden_size=96, n_layer=2, n_head=6, tie_word_embeddings=False),
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    """Weights large enough that logits spread out (greedy choices are not near-ties),
    norms and biases away from their 1 / 0 initial values."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def build_folder(name: str, folder: Path, tokenizer_folder: Path) -> torch.nn.Module:
    """A tiny `name` model saved into `folder` with the default model's tokenizer; returns
    transformers' model (fp32, eval)."""
    _, config_cls, model_cls, extra = CASES[name]
    vocab_size = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    config = config_cls(vocab_size=vocab_size, **SPECIAL_IDS, **extra)
    model = model_cls(config).eval()
    _randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_folder / file).exists():
            shutil.copy(tokenizer_folder / file, folder / file)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, tmp_path_factory, model_folder: Path):
    folder = tmp_path_factory.mktemp(request.param)
    reference = build_folder(request.param, folder, model_folder)
    return request.param, folder, reference, load_model(folder, torch.float32)


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(1)
    return {
        "a": torch.randint(3, 49152, (45,), generator=gen).tolist(),
        "b": torch.randint(3, 49152, (30,), generator=gen).tolist(),
    }


@pytest.fixture(scope="module")
def hf_logits(family, prompts) -> dict[str, torch.Tensor]:
    _, _, reference, _ = family
    with torch.no_grad():
        return {k: reference(torch.tensor([v])).logits[0].float() for k, v in prompts.items()}


def _runner(model) -> ModelRunner:
    return ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32)


def _two_seqs(prompts: dict[str, list[int]]) -> tuple[Sequence, Sequence]:
    """Sequences "a" and "b" of the prompts, their blocks drawn from a shuffled pool: a
    wrong slot cannot go unseen."""
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(2)).tolist()
    na = -(-len(prompts["a"]) // BLOCK_SIZE)
    nb = -(-len(prompts["b"]) // BLOCK_SIZE)
    return (
        seq_with_blocks("a", prompts["a"], order[:na]),
        seq_with_blocks("b", prompts["b"], order[na : na + nb]),
    )


def test_reference_is_not_degenerate(family, hf_logits) -> None:
    """Guards the comparisons below against a vacuous pass (e.g. all-equal logits)."""
    ref = hf_logits["a"]
    assert ref.std().item() > 0.5
    assert (ref[1:] - ref[:-1]).abs().max().item() > 1.0


def test_loaded_as_its_family(family) -> None:
    name, folder, _, ours = family
    config = json.loads((folder / "config.json").read_text())
    assert family_for(config).name == CASES[name][0]
    assert type(ours) is family_for(config).model_cls


def test_prefill_matches_transformers(family, prompts, hf_logits) -> None:
    _, _, _, ours = family
    runner = _runner(ours)
    a, b = _two_seqs(prompts)
    batch = SchedulerOutput([a, b], [len(prompts["a"]), len(prompts["b"])], is_prefill=True)
    logits = all_logits(runner, batch)
    na = len(prompts["a"])
    assert max_diff(logits[:na], hf_logits["a"]) < ATOL
    assert max_diff(logits[na:], hf_logits["b"]) < ATOL


def test_paged_decode_matches_transformers(family, prompts, hf_logits) -> None:
    """A 3-token prefill, then one token per step for two sequences of different lengths:
    each step reads the paged pool through the block tables, across block boundaries."""
    _, _, _, ours = family
    runner = _runner(ours)
    prefix = 3
    a, b = _two_seqs(prompts)
    runner.execute(SchedulerOutput([a, b], [prefix, prefix], is_prefill=True))
    a.num_computed_tokens = b.num_computed_tokens = prefix
    worst, steps = 0.0, 0
    while live := [s for s in (a, b) if s.num_computed_tokens < len(s.prompt_token_ids)]:
        batch = SchedulerOutput(live, [1] * len(live), is_prefill=False)
        assert runner._prepare(batch)[2].all_decode
        logits = runner.execute(batch)
        for row, seq in enumerate(live):
            pos = seq.num_computed_tokens
            worst = max(worst, max_diff(logits[row], hf_logits[seq.req_id][pos]))
            seq.num_computed_tokens += 1
            steps += 1
    assert steps == len(prompts["a"]) + len(prompts["b"]) - 2 * prefix
    assert worst < ATOL


def test_chunked_prefill_with_a_decode_row_matches_transformers(family, prompts, hf_logits) -> None:
    """A cached prefix then the rest of A (its queries over gathered blocks), in the same
    step as B's last token (a decode row batched on its own): the mixed-step path."""
    _, _, _, ours = family
    runner = _runner(ours)
    first, nb = 2 * BLOCK_SIZE + 1, len(prompts["b"])
    a, b = _two_seqs(prompts)
    runner.execute(SchedulerOutput([a, b], [first, nb - 1], is_prefill=True))
    a.num_computed_tokens, b.num_computed_tokens = first, nb - 1
    rest = len(prompts["a"]) - first
    logits = all_logits(runner, SchedulerOutput([a, b], [rest, 1], is_prefill=True))
    assert max_diff(logits[:rest], hf_logits["a"][first:]) < ATOL
    assert max_diff(logits[rest], hf_logits["b"][-1]) < ATOL


def test_short_multi_token_queries_match_transformers(family, prompts, hf_logits) -> None:
    """A few tokens per sequence over a cached context, in one batched call (the shape of
    a speculative verification step)."""
    _, _, _, ours = family
    runner = _runner(ours)
    a, b = _two_seqs(prompts)
    done_a, done_b = 4 * BLOCK_SIZE + 2, 3 * BLOCK_SIZE + 3
    runner.execute(SchedulerOutput([a, b], [done_a, done_b], is_prefill=True))
    a.num_computed_tokens, b.num_computed_tokens = done_a, done_b
    batch = SchedulerOutput([a, b], [5, 3], is_prefill=True)
    assert attention._short_queries_only(runner._prepare(batch)[2])
    logits = all_logits(runner, batch)
    assert max_diff(logits[:5], hf_logits["a"][done_a : done_a + 5]) < ATOL
    assert max_diff(logits[5:], hf_logits["b"][done_b : done_b + 3]) < ATOL


def test_greedy_generation_matches_transformers(family, prompts) -> None:
    _, _, reference, ours = family
    prompt = prompts["b"]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=NUM_NEW_TOKENS,
            min_new_tokens=NUM_NEW_TOKENS,
            do_sample=False,
        )[0, len(prompt) :].tolist()
    config = EngineConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_model_len=256)
    engine = LLMEngine(ours, config, ours.arch.eos_token_ids)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS, temperature=0.0)
    engine.add_request(Sequence("a", prompt, params))
    got: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            got.extend(out.new_token_ids)
    assert len(expected) == NUM_NEW_TOKENS
    assert got == expected


def test_decode_over_quantized_kv_units_sees_their_dequantized_values(
    family, prompts, tmp_path: Path
) -> None:
    """Staged KV: three int8 units of a sequence's cache, read by decode where they are
    (scales folded into the attention; ALiBi at each key's logical position), give the
    logits of a cache holding their dequantized values at full precision. The importance
    layer takes the torch path; the other, the kernel where the family allows it."""
    _, _, _, ours = family
    unit_blocks, units = 2, [0, 1, 2]
    config = EngineConfig(
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_model_len=256,
        kv_unit_tokens=unit_blocks * BLOCK_SIZE,
        kv_spill_dir=str(tmp_path),
    )
    engine = LLMEngine(ours, config, ours.arch.eos_token_ids)
    engine.add_request(Sequence("s", prompts["a"], SamplingParams(max_tokens=8, temperature=0)))
    engine.step()  # prefill
    seq = engine.scheduler.running[0]
    batch = engine.scheduler.schedule()  # the decode step, its new slot allocated
    assert batch is not None and not batch.is_prefill
    cache = engine.runner.kv_cache
    original = cache.clone()
    for u in units:  # the reference: units fake-quantized in place, read as L0 blocks
        blocks = seq.block_table[u * unit_blocks : (u + 1) * unit_blocks]
        data = cache[:, :, blocks].flatten(2, 3)  # [L, 2, unit tokens, Hkv, D]
        cache[:, :, blocks] = dequantize_block(quantize_block(data, 8)).view_as(cache[:, :, blocks])
    reference = engine.runner.execute(batch, importance_layer=1)
    cache.copy_(original)
    for u in units:
        engine.staged.demote(seq, u, unit_blocks, Level.L1)
    assert seq.block_table[: len(units) * unit_blocks] == [HOLE] * (len(units) * unit_blocks)
    plan = engine.staged.plan(batch.seqs)
    assert plan is not None and plan.compact is not None
    staged = engine.runner.execute(batch, plan, importance_layer=1)
    torch.testing.assert_close(staged, reference, rtol=0, atol=1e-4)


def test_pytorch_bin_folder_loads_the_same_weights(tmp_path: Path, model_folder: Path) -> None:
    """A folder with only `pytorch_model.bin` (read with weights_only) loads as its
    safetensors twin does."""
    reference = build_folder("gpt_neox", tmp_path / "st", model_folder)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", bin_folder / "config.json")
    torch.save(reference.state_dict(), bin_folder / "pytorch_model.bin")
    from_st = load_model(tmp_path / "st", torch.float32)
    from_bin = load_model(bin_folder, torch.float32)
    for (name, p), (_, q) in zip(
        from_st.named_parameters(), from_bin.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name


def test_unknown_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*Qwen3ForCausalLM"):
        load_model(tmp_path, torch.float32)
