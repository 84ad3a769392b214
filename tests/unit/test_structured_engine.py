"""Structured output in the engine: the sampler masks constrained rows of a batch and
leaves the others bit-identical; on a tiny random Llama over the default model's
tokenizer, constrained sequences decode to output their grammar accepts, finish with
"stop" once it is complete (or "length"), and greedy output is the same with speculation
(the grammar validates drafts and masks every verified position) as without."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers

from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.logits_processors import Row, process
from serving.engine.sampler import sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.models.loader import load_model
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.proposer import NgramProposer, TruncatedDraft
from serving.structured.backend import allocate_bitmask
from serving.structured.engine_grammar import EngineGrammar, build_engine_grammar
from serving.structured.spec import StructuredSpec
from serving.structured.walk import allowed_token_ids

VOCAB = 49152
EOS = (2,)  # SmolLM2's <|im_end|>
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["alpha", "beta"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["kind", "count", "ok"],
    "additionalProperties": False,
}
SPECS = {
    "schema": StructuredSpec.json_schema(SCHEMA),
    "choice": StructuredSpec.choice(["yes", "no", "maybe"]),
    "regex": StructuredSpec.regex(r"[0-9]{3}-[a-c]{2}"),
}


@pytest.fixture(scope="module")
def grammar(tokenizer) -> EngineGrammar:
    return build_engine_grammar(tokenizer, VOCAB, EOS)


def _seq(name: str, **params) -> Sequence:
    return Sequence(name, [1, 5, 9], SamplingParams(max_tokens=40, **params))


def test_constrained_rows_masked_unconstrained_rows_bit_identical(grammar) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 3
    seqs = [
        _seq("free-greedy", temperature=0.0, presence_penalty=0.5),
        _seq("json", temperature=0.0, structured=SPECS["schema"]),
        _seq("free-sampled", temperature=0.8, seed=3),
        _seq("choice", temperature=0.9, seed=4, structured=SPECS["choice"]),
    ]
    seqs[0].output_token_ids = [7, 7]
    plain = [s if s.params.structured is None else _seq(s.req_id, temperature=0.0) for s in seqs]
    reference = logits.clone()
    process(reference, [Row(s) for s in plain], EOS)  # no grammar anywhere
    for s in seqs:
        if s.params.structured is not None:
            s.grammar = grammar.state_for(s.params.structured)
    masked = logits.clone()
    process(masked, [Row(s) for s in seqs], EOS)
    for row in (0, 2):
        assert torch.equal(masked[row], reference[row])
    for row in (1, 3):
        bitmask = allocate_bitmask(1, VOCAB)
        seqs[row].grammar.matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_token_ids(bitmask[0], VOCAB)
        finite = torch.isfinite(masked[row]).nonzero().flatten()
        assert torch.equal(finite, allowed) and 0 < len(allowed) < VOCAB
        assert torch.equal(masked[row, allowed], reference[row, allowed])
    tokens = sample(logits.clone(), seqs, EOS)
    for row in (1, 3):
        assert seqs[row].grammar.matcher.accept_token(tokens[row])


def test_no_constrained_row_leaves_the_batch_untouched() -> None:
    logits = torch.randn(3, VOCAB)
    out = logits.clone()
    process(out, [Row(_seq(str(i), temperature=0.0)) for i in range(3)], EOS)
    assert torch.equal(out, logits)


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory) -> Path:
    """A random 2-layer Llama over the real vocabulary (so real grammars apply)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-wide")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


class AlwaysSpeculate:
    def should_speculate(self, num_seqs: int) -> bool:
        return True

    def observe(self, *args) -> None:
        pass


def _run(folder: Path, grammar: EngineGrammar, spec: str | None) -> dict[str, tuple]:
    model = load_model(folder, torch.float32)
    cfg = EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_model_len=96)
    engine = LLMEngine(model, cfg, EOS)
    if spec is not None:
        proposer = TruncatedDraft(engine.runner, 1) if spec == "truncated" else NgramProposer(2, 1)
        engine.attach_spec(SpecDecodeStep(engine, proposer, k_max=3, gate=AlwaysSpeculate()))
    requests = {
        "free": SamplingParams(max_tokens=24, temperature=0.0),
        **{
            name: SamplingParams(max_tokens=60, temperature=0.0, structured=s)
            for name, s in SPECS.items()
        },
        "seeded": SamplingParams(
            max_tokens=60, temperature=1.0, seed=9, structured=SPECS["schema"]
        ),
    }
    for name, params in requests.items():
        seq = Sequence(name, [1, 5, 9, 5, 9], params)
        if params.structured is not None:
            seq.grammar = grammar.state_for(params.structured)
        engine.add_request(seq)
    out: dict[str, list] = {}
    reasons: dict[str, str] = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out.setdefault(o.req_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.req_id] = o.finish_reason
    assert not engine.has_unfinished()
    return {r: (out[r], reasons[r]) for r in out}


def test_engine_output_matches_the_grammar_with_and_without_speculation(
    tiny_wide: Path, grammar: EngineGrammar, tokenizer
) -> None:
    plain = _run(tiny_wide, grammar, None)
    for name in ("schema", "choice", "regex", "seeded"):
        tokens, reason = plain[name]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "length":
            continue
        assert reason == "stop", (name, reason)
        if name in ("schema", "seeded"):
            jsonschema.validate(json.loads(text), SCHEMA)
        elif name == "choice":
            assert text in ("yes", "no", "maybe")
        else:
            assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", text), text
    assert sum(plain[n][1] == "stop" for n in SPECS) >= 2  # not everything cut by length
    for method in ("ngram", "truncated"):
        specd = _run(tiny_wide, grammar, method)
        for name in ("free", *SPECS):  # greedy: token for token
            assert specd[name] == plain[name], (method, name)


def test_a_refused_replay_is_an_error_not_a_state(grammar, tokenizer) -> None:
    from serving.structured.request import InvalidStructuredOutput

    bad = tokenizer.encode("hello", add_special_tokens=False)
    with pytest.raises(InvalidStructuredOutput):
        grammar.state_for(SPECS["schema"], bad)
    good = tokenizer.encode('{"kind":', add_special_tokens=False)
    state = grammar.state_for(SPECS["schema"], good)
    assert not state.matcher.is_terminated()
