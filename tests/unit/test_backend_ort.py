"""ONNX Runtime decode backend on a tiny random Llama: same tokens as the torch runner,
IOBinding buffers reused across steps, blocks imported from other dtypes / quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from serving.backends.ort.engine import OrtLLMEngine  # noqa: E402
from serving.backends.ort.export import export_decode_step  # noqa: E402
from serving.backends.ort.runner import OrtModelRunner, make_session  # noqa: E402
from serving.engine.engine import EngineConfig, LLMEngine, StepOutput  # noqa: E402
from serving.engine.sampling_params import SamplingParams  # noqa: E402
from serving.engine.sequence import Sequence  # noqa: E402
from serving.kv.quant import dequantize_block, quantize_block  # noqa: E402
from serving.models.arch import LlamaArch  # noqa: E402
from serving.models.llama import LlamaForCausalLM  # noqa: E402

ARCH = LlamaArch(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    qkv_bias=False,
    rope_scaling=None,
    bos_token_id=1,
    eos_token_ids=(2,),
)
CONFIG = EngineConfig(
    num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=200
)
PROMPTS = [[5, 17, 33, 9, 100, 4, 8], list(range(40, 66)), [7, 7, 7]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(ARCH).eval()
    with torch.no_grad():  # spread the logits so greedy choices are not near-ties
        m.embed_tokens.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def graph(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "decode_step.onnx"
    export_decode_step(model, path)
    return path


def _ort_engine(graph: Path) -> LLMEngine:
    session, _ = make_session(graph, ["CPUExecutionProvider"], 1)
    runner = OrtModelRunner(session, ARCH, CONFIG.num_blocks, CONFIG.block_size)
    return OrtLLMEngine(None, CONFIG, ARCH.eos_token_ids, runner=runner)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            return tokens
        out: list[StepOutput] = engine.step()
        for o in out:
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


def test_greedy_tokens_match_the_torch_runner(model, graph) -> None:
    results = []
    for engine in (LLMEngine(model, CONFIG, ARCH.eos_token_ids), _ort_engine(graph)):
        for i, p in enumerate(PROMPTS):
            engine.add_request(Sequence(f"r{i}", list(p), _greedy(30)))
        results.append(_drain(engine))
    torch_tokens, ort_tokens = results
    assert ort_tokens == torch_tokens
    assert all(len(t) == 30 for t in ort_tokens.values())
    assert len({tuple(t) for t in ort_tokens.values()}) == len(PROMPTS)


def test_logits_match_the_torch_runner_on_an_imported_prefix(model, graph) -> None:
    """KV exported by a torch prefill, imported by ORT: the next logits agree."""
    prefill = LLMEngine(model, CONFIG, ARCH.eos_token_ids)
    seq = Sequence("p", PROMPTS[1], _greedy(1), export_kv=True)
    prefill.add_request(seq)
    (out,) = prefill.step()
    assert out.kv_export is not None
    logits = []
    for engine in (LLMEngine(model, CONFIG, ARCH.eos_token_ids), _ort_engine(graph)):
        s = Sequence("d", PROMPTS[1], _greedy(1))
        s.output_token_ids = list(out.new_token_ids)
        s.kv_import = out.kv_export
        engine.add_request(s)
        batch = engine.scheduler.schedule()
        assert batch is not None and not batch.is_prefill
        logits.append(engine.runner.execute(batch).clone())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


class _RecordingBinding:
    """Wraps an IOBinding and keeps the buffer address bound to each name, per step."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[dict[str, int]] = [{}]

    def bind_input(self, name, device, device_id, dtype, shape, ptr):
        self.steps[-1][name] = ptr
        self.inner.bind_input(name, device, device_id, dtype, shape, ptr)

    def bind_output(self, name, device, device_id, dtype, shape, ptr):
        self.steps[-1][name] = ptr
        self.inner.bind_output(name, device, device_id, dtype, shape, ptr)

    def clear_binding_inputs(self):
        self.steps.append({})
        self.inner.clear_binding_inputs()

    def clear_binding_outputs(self):
        self.inner.clear_binding_outputs()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_iobinding_buffers_are_reused_across_decode_steps(graph) -> None:
    engine = _ort_engine(graph)
    runner: OrtModelRunner = engine.runner  # type: ignore[assignment]
    recorder = _RecordingBinding(runner.binding)
    runner.binding = recorder
    for i, p in enumerate(PROMPTS):
        engine.add_request(Sequence(f"r{i}", list(p), _greedy(60)))
    steps: list[tuple[int, dict[str, int], dict[str, int]]] = []
    while engine.has_unfinished():
        before = runner.buffers.num_allocations
        engine.step()
        if engine.last_step is not None and not engine.last_step.is_prefill:
            grew = runner.buffers.num_allocations - before
            steps.append((grew, recorder.steps[-1], runner.buffers.data_ptrs()))
    assert len(steps) >= 55
    # Context grows from 30 to 90 tokens: buffers grow at powers of two, not every step.
    num_growing = sum(1 for grew, _, _ in steps if grew)
    assert num_growing <= 4, f"{num_growing} of {len(steps)} decode steps allocated"
    for _, bound, ptrs in steps:
        # every KV input and output, and the logits, live in the pool's reused buffers
        assert bound["past.0.key"] == ptrs["past"]
        assert bound["present.0.key"] == ptrs["present"]
        assert bound["logits"] == ptrs["logits"]
    stable = [ptrs for grew, _, ptrs in steps if not grew]
    assert len({tuple(sorted(p.items())) for p in stable}) <= num_growing + 1


def test_import_converts_bfloat16_and_dequantizes_quantized_blocks(model, graph) -> None:
    engine = _ort_engine(graph)
    runner: OrtModelRunner = engine.runner  # type: ignore[assignment]
    shape = runner.layout.block_shape()
    torch.manual_seed(1)
    dense = torch.randn(shape, dtype=torch.bfloat16)
    quantized = quantize_block(torch.randn(shape), bits=8)
    from serving.kv.block_format import KVLayout, KVPayload

    layout = KVLayout(ARCH.num_layers, ARCH.num_kv_heads, ARCH.head_dim, 4, "bfloat16")
    runner.import_blocks([3, 5], KVPayload(layout, 8, [dense, quantized]))
    assert torch.equal(runner.kv_cache[:, :, 3], dense.float())
    assert torch.equal(runner.kv_cache[:, :, 5], dequantize_block(quantized, torch.float32))
    other = KVLayout(ARCH.num_layers, ARCH.num_kv_heads, ARCH.head_dim, 8, "float32")
    with pytest.raises(ValueError, match="does not match"):
        runner.import_blocks([1], KVPayload(other, 8, [torch.zeros(other.block_shape())]))


def test_kv_profile_changes_are_declined_not_fatal(model, graph, caplog) -> None:
    """Staged KV is the torch runner's: the ORT engine keeps baseline, warns, and decodes."""
    import dataclasses

    expected = LLMEngine(model, CONFIG, ARCH.eos_token_ids)
    expected.add_request(Sequence("r", list(PROMPTS[1]), _greedy(40)))
    engine = _ort_engine(graph)
    engine.set_kv_policy("aggressive", 16)
    params = dataclasses.replace(_greedy(40), kv_profile="aggressive")
    engine.add_request(Sequence("r", list(PROMPTS[1]), params))
    assert _drain(engine) == _drain(expected)
    assert "ignored" in caplog.text
