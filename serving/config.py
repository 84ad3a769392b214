"""User-facing settings (YAML file and CLI flags), validated with pydantic.

`inferos serve --config FILE` reads the YAML; flags override single fields. The whole
`InferosConfig` travels to every deployment as a plain dict and is re-validated there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from serving.backends.ort.providers import DEFAULT_PREFERENCE as DEFAULT_PROVIDERS
from serving.engine.engine import EngineConfig
from serving.models.weight_formats import Int4Recipe


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls in hardware (AVX-512-BF16 or AMX tiles), as torch sees this CPU."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    path: str | None = Field(
        None,
        description="Local HF folder of a Llama, Mistral, Qwen2/3, GPT-NeoX, GPT-J or BLOOM "
        "model, or a llama.cpp .gguf file (Llama, Mistral, Qwen2/3, BLOOM: what transformers' "
        "GGUF reader takes; converted into the model cache once); "
        "None = the default model",
    )
    served_model_name: str | None = Field(
        None, description="Name in /v1/models; default: folder name"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto: the fastest on this CPU: bfloat16 where it multiplies bf16 natively "
        "(AVX-512-BF16, AMX), else float32 compute with the int4 path for small steps and bf16 "
        "copies where bf16 measures faster; bfloat16 halves the bytes read per decode step; "
        "float32: fp32 everywhere (no int4 path: transformers' numerics)",
    )
    max_model_len: PositiveInt = Field(2048, description="Prompt + generated tokens per request")
    int4_max_tokens: int = Field(
        256,
        ge=0,
        description="bfloat16 only: engine steps of up to this many tokens use a 4-bit repack "
        "of linear weights that came from a 4-bit GGUF (on a CPU with AMX or AVX-512 VNNI: "
        "the W4A8 kernel, activations rounded to int8 per group of 32 as llama.cpp does, "
        "exact up to 4 rows; else exact), or the "
        "int8/int4 kernels of weights: int8|int4 (0 = off); with dense_kernels measured, "
        "each weight shape uses it up to the token count (at most this) where it measures "
        "faster than the dense matmul on this machine",
    )
    weights: Literal["auto", "bf16", "int8", "int4"] = Field(
        "auto",
        description="Linear weights as loaded: auto = dense, with the lossless int4 repack and "
        "int8 LM head for weights on a GGUF grid (the default model); bf16 = dense only (the "
        "model's dtype); int8 = per-output-channel int8; int4 = group-wise int4 "
        "(int4_group_size), LM head int8. int8/int4 are quantized at load (cached under "
        "$INFEROS_HOME/models/.quantized) and run steps of up to int4_max_tokens tokens on "
        "int8/int4 kernels, larger ones dense on the dequantized weights",
    )
    int4_group_size: Literal[32, 64, 128] = Field(
        32,
        description="weights: int4 only: inputs per int4 scale and zero (32: measured, see "
        "serving/models/weight_formats.py)",
    )
    int4_calibration: Path | None = Field(
        None,
        description="weights: int4 only: a UTF-8 text file to calibrate GPTQ on (act order, "
        "64 windows of 512 tokens, ~2 min for the default model, cached): each layer's "
        "rounding errors compensated on its inputs; off a GGUF grid it takes SmolLM2's int4 "
        "from +13.4 % to +4.3 % ppl (benchmarks/results/2026-12-06/int4-gptq); None = "
        "round-to-nearest, enough for weights already on a 4-bit GGUF grid (the default model)",
    )
    int4_int8_layers: list[str] = Field(
        ["qkv_proj"],
        description="weights: int4 only: module names kept at int8 per channel (the LM head "
        "always is): the attention's qkv projection is the most sensitive to int4 (measured: "
        "see serving/models/weight_formats.py); [] = every linear layer int4",
    )

    def int4_recipe(self) -> Int4Recipe:
        return Int4Recipe(
            self.int4_group_size, self.int4_calibration, tuple(self.int4_int8_layers)
        )

    dense_kernels: Literal["measured", "model_dtype"] = Field(
        "measured",
        description="bfloat16 only: measured = larger steps switch to fp32 matmuls from the "
        "batch size where this machine runs them faster (CPUs without native bf16: AVX2), "
        "measured once per machine into $INFEROS_HOME/kernels.json; model_dtype = never",
    )

    @model_validator(mode="after")
    def _calibration_is_a_file_for_int4(self) -> ModelSettings:
        if self.int4_calibration is None:
            return self
        if self.weights != "int4":
            raise ValueError(
                f"model.int4_calibration calibrates int4 weights; model.weights is {self.weights!r}"
            )
        if not Path(self.int4_calibration).expanduser().is_file():
            raise ValueError(f"model.int4_calibration: no such file: {self.int4_calibration}")
        return self


class KVCacheSettings(_Strict):
    block_size: Literal[8, 16, 32] = 16
    num_blocks: PositiveInt = Field(1024, description="KV blocks per engine (prefill and decode)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="KV cache dtype; auto = the model's dtype, but float32 for a bfloat16 "
        "model on a CPU without native bf16 (no AVX-512-BF16 or AMX: attention's small "
        "bf16 matmuls run emulated there, 8x slower than fp32)",
    )
    store_budget_bytes: PositiveInt = Field(
        2 * 1024**3,
        description="Bytes of KV the kv_store keeps in memory; beyond it, blocks are demoted, "
        "then whole sequences spilled to disk (spill_budget_bytes), least recently used first",
    )
    spill_budget_bytes: PositiveInt = Field(
        4 * 1024**3,
        description="Bytes the kv_store may write to its spill directory (spilled sequences, "
        "and the originals that make demotion lossless); beyond it the least useful stored "
        "sequences are dropped (never re-used ones first, then least recently used): a later "
        "cache miss, never an error. A full disk is answered the same way",
    )
    store_ttl_s: float | None = Field(
        900.0,
        gt=0,
        description="seconds a stored sequence stays after its last use unless a later prompt "
        "re-used it as a prefix (the next turn of a conversation comes well within it); "
        "re-used prefixes stay until a budget needs their room; None = only the budgets drop",
    )
    profile: Literal["baseline", "safe", "balanced", "aggressive"] = Field(
        "baseline",
        description="staged-KV profile at start (changeable at run time and per request)",
    )
    quant_unit_tokens: PositiveInt = Field(
        128,
        description="tokens quantized together as one unit (a multiple of block_size); "
        "larger units amortize scales better; the profiles were tuned at 128",
    )
    prefix_reuse: bool = Field(
        True,
        description="prefill computes only the prompt tokens whose KV isn't stored yet "
        "(the earlier turns of a conversation, a shared system prompt)",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="as vLLM's: the full KV blocks of finished requests stay in the engine's "
        "pool, found again by their tokens, until a new request needs the room; a prompt "
        "that starts the same way (the next turn, a shared system prompt) computes only the "
        "rest, without a trip to the kv_store. Off when prefix_reuse is off",
    )
    spill_dir: str | None = Field(
        None,
        description="local directory of the spill tier (L3, and originals of demoted blocks "
        "that make promotion lossless); the kv_store writes into a subdirectory of its own, "
        "removed at shutdown; None = the system's temporary directory (a fresh directory "
        "per engine process)",
    )


class SchedulingSettings(_Strict):
    max_num_seqs: PositiveInt = Field(64, description="Sequences in one decode batch")
    max_num_batched_tokens: PositiveInt = Field(
        512,
        description="token budget of one engine step: every running sequence's next token, "
        "then chunks of waiting prompts (chunked prefill); on a 2-core CPU 512 prompt tokens "
        "cost about one second, so a burst of new prompts never stalls running streams longer",
    )
    max_pending_requests: PositiveInt = Field(
        256, description="Requests admitted at once by the ingress; beyond them 429"
    )
    pd_mode: Literal["disaggregated", "colocated", "auto"] = Field(
        "auto",
        description="disaggregated: prefill replicas compute the prompt's KV and hand it to "
        "decode through the kv_store; colocated: the decode replica prefills too (one "
        "process per request: what pays on a small CPU-only box); auto: per request, short "
        "prompts prefill on the decode replica, and where prefill and decode would share one "
        "node's CPU cores no prefill replica is started at all (one engine per node)",
    )
    stream_interval: PositiveInt | None = Field(
        None,
        description="Engine steps per streamed chunk (like vLLM's --stream-interval); None: "
        "by load, every step while few sequences run, up to 8 steps at 32 and more "
        "(`deployments/stream_interval.py`); a request's first token always goes out at once",
    )
    request_timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="a request still running after this long ends with a 503 "
        "'request_timeout' error (its sequence is aborted, nothing else is affected)",
    )
    failover_wait_s: float = Field(
        120.0,
        ge=0,
        description="a stream whose decode replica died waits this long for another (or the "
        "restarted) decode replica, then resumes there after the tokens already sent; "
        "0: no failover, the stream ends with a 503",
    )
    failover_max_resumes: NonNegativeInt = Field(
        2,
        description="resumes of one stream at most, so a request that kills every replica "
        "it reaches cannot take them all down one after the other",
    )


class RoleSettings(_Strict):
    num_replicas: NonNegativeInt = Field(
        1, description="prefill: 0 = none (the decode replicas prefill: colocated)"
    )
    autoscaling_config: dict | None = Field(
        None,
        description="Ray Serve autoscaling (min_replicas, max_replicas, "
        "target_ongoing_requests, ...), passed through; replaces num_replicas when set",
    )
    num_cpus: float = Field(
        0.5, ge=0, description="Ray CPUs reserved per replica (fractional is fine)"
    )
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description='e.g. {"NPU": 1}')
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replica must land on, e.g. A100 or AMD-Ryzen-AI"
    )
    torch_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads in this replica; None = the node's cores, split "
        "between prefill and decode when they run as separate processes",
    )
    backend: Literal["torch", "onnxruntime", "vllm"] = Field(
        "torch",
        description="engine of this role (serving/backends): torch; onnxruntime (decode: the "
        "exported decode step on the first available execution provider); vllm (prefill)",
    )
    execution_providers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="onnxruntime backend: providers in order of preference; absent ones are "
        "skipped with a warning, CPUExecutionProvider is always the last resort",
    )


def _check_autoscaling(role: RoleSettings, name: str) -> None:
    if role.autoscaling_config is None:
        return
    from ray.serve.config import AutoscalingConfig

    fields = getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__
    unknown = set(role.autoscaling_config) - set(fields)
    if unknown:
        raise ValueError(f"{name}.autoscaling_config: unknown fields {sorted(unknown)}")
    try:
        AutoscalingConfig(**role.autoscaling_config)
    except Exception as e:  # pydantic (v1 or v2) inside Ray: say where, keep Ray's words
        raise ValueError(f"{name}.autoscaling_config: {e}") from None


class ControlSettings(_Strict):
    """The scheduler's control loops (see `policies/control.py`)."""

    enabled: bool = True
    fast_period_s: float = Field(0.01, gt=0, description="anomalies, memory pressure")
    mid_period_s: float = Field(0.1, gt=0, description="KV window, batch limits")
    slow_period_s: float = Field(1.0, gt=0, description="undo pressure profile, end fallback")
    replica_down_after_s: float = Field(
        5.0, gt=0, description="a replica silent this long is an anomaly (fallback)"
    )
    max_error_rate: float = Field(
        0.5, gt=0, le=1, description="server-side failures among the last 50 requests"
    )
    pressure_high: float = Field(
        0.9, gt=0, le=1, description="decode KV usage that calls for a lossy profile"
    )
    fallback_hold_s: float = Field(
        30.0, ge=0, description="baseline behaviour lasts this long after the last anomaly"
    )


# Open without an API key: what a load balancer and Prometheus probe, and the console's page
# and scripts (they hold no data; every call the page makes sends the key it is given).
DEFAULT_PUBLIC_PATHS = ("/health", "/metrics", "/", "/console/")
DEFAULT_MAX_HEADER_BYTES = 64 << 10
MIN_BODY_BYTES = 1 << 20  # a body limit below 1 MiB would refuse ordinary chat histories
BODY_BYTES_PER_TOKEN = 64  # ~4 bytes of text per token, x4 for JSON escapes, x4 headroom


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | list[str] | None = Field(
        None,
        description="If set (one key or a list), every route outside server.public_paths "
        "needs 'Authorization: Bearer KEY' with one of them (or the admin token); `inferos serve` "
        "falls back to $INFEROS_API_KEY; unset = open",
    )
    public_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PUBLIC_PATHS),
        description="paths open without an API key (an entry ending in '/' opens its "
        "subtree): the health check, Prometheus' scrape and the console's page and scripts",
    )
    max_body_bytes: int | None = Field(
        None,
        gt=0,
        description="largest request body (413 beyond it, checked before reading when the "
        "client declares its length); None = 64 bytes per token of model.max_model_len, "
        "at least 1 MiB",
    )
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES, gt=0, description="all request headers together (431 beyond)"
    )
    admin_token: str | None = Field(
        None,
        description="Token for the control API's changes (POST /v1/policy, /v1/run-context: "
        "'Authorization: Bearer TOKEN'); None = INFEROS_ADMIN_TOKEN, unset = changes refused",
    )
    telemetry_dir: str | None = Field(
        None,
        description="If set, the ingress appends a JSON line of live metrics every "
        "second to DIR/metrics_*.jsonl",
    )
    direct_http: bool = Field(
        True,
        description="On a local cluster `inferos serve` starts (not with RAY_ADDRESS, not "
        "`serve run`/KubeRay): the ingress replica(s) answer host:port themselves with "
        "uvicorn, so a streamed chunk skips the hop through Serve's proxy (~15% more output "
        "tokens/s at 32 streams on 2 cores); the proxy moves to a free port on the same "
        "host. Off while ingress.autoscaling_config is set (Serve's autoscaler counts only "
        "requests through its proxy). false: Serve's proxy serves host:port",
    )


class SpeculationSettings(_Strict):
    """Speculative decoding on decode replicas (switchable at run time: RuntimePolicy)."""

    enabled: bool = Field(
        True,
        description="speculate from the start (the gate still measures, per batch size, "
        "whether it pays, and speculates only where it does)",
    )
    method: Literal["truncated", "ngram", "model"] = Field(
        "ngram",
        description="truncated: the target's first num_draft_layers layers + final norm + "
        "LM head (no extra weights, shares the target's KV); ngram: prompt lookup; model: "
        "the model folder draft_model (same tokenizer)",
    )
    draft_model: str | None = Field(None, description="method=model: local HF folder")
    placement: Literal["in_process", "deployment"] = Field(
        "in_process",
        description="in_process: the proposer runs in the decode replica (no hop per step); "
        "deployment: in the `draft` deployment (a draft on another device), one batched call "
        "per engine step",
    )
    num_draft_layers: PositiveInt = Field(
        30,
        description="method=truncated: target layers the draft runs (SmolLM2-135M: fewer "
        "than all 30 accept too little; its LM head is the cost the draft saves)",
    )
    draft_vocab_size: PositiveInt | None = Field(
        16384,
        description="drafts only tokens with ids below this (the LM head dominates a small "
        "model's step; low BPE ids are the frequent ones); None = the whole vocabulary",
    )
    k_max: int = Field(
        3,
        ge=1,
        le=16,
        description="most draft tokens per sequence and step (3: a single sequence's verify "
        "pass of 4 tokens costs 1.3x a plain step on CPU, 5-8 tokens 1.7-1.8x)",
    )
    ngram_max: PositiveInt = Field(3, description="method=ngram: longest suffix n-gram")
    ngram_min: PositiveInt = Field(
        2,
        description="method=ngram: shortest suffix n-gram (a 1-gram match drafts a wrong token "
        "more often than a right one on chat text)",
    )
    draft_num_blocks: PositiveInt = Field(
        512, description="method=model: KV blocks of the draft's own cache"
    )

    @model_validator(mode="after")
    def _draft_model_for_model(self) -> SpeculationSettings:
        if self.method == "model" and not self.draft_model:
            raise ValueError("speculation.method=model needs speculation.draft_model")
        if self.ngram_min > self.ngram_max:
            raise ValueError("speculation.ngram_min must be <= ngram_max")
        return self


class StructuredOutputSettings(_Strict):
    """Structured output (`response_format`, vLLM's `structured_outputs`) and the grammar
    that `tool_choice` `required` or a named function imposes."""

    backend: Literal["llguidance", "xgrammar"] = Field(
        "llguidance",
        description="grammar engine (as vLLM's --structured-outputs-config.backend); "
        "llguidance measured best on CPU (benchmarks/results/2026-12-05/grammar/); "
        "xgrammar needs the `xgrammar` package",
    )
    any_whitespace: bool = Field(
        False,
        description="JSON output may put any whitespace between tokens (vLLM's default); "
        "false (ours): compact JSON only, as vLLM's disable_any_whitespace: a small model "
        "given the choice tends to fill max_tokens with newlines instead of closing the object",
    )


class ToolCallSettings(_Strict):
    """Tool calling (as vLLM's --enable-auto-tool-choice / --tool-call-parser)."""

    enable_auto_tool_choice: bool = Field(
        True,
        description="`tool_choice: auto` (the default with `tools`) parses the model's "
        "tool calls out of its text with tool_call_parser; false: such requests get a 400, "
        "as vLLM without --enable-auto-tool-choice ('required' and named functions work)",
    )
    tool_call_parser: Literal["hermes", "json"] = Field(
        "hermes",
        description="format of the model's tool calls under tool_choice auto: hermes "
        "(<tool_call>{json}</tool_call>) or json (the whole answer is a call or a list)",
    )


class InferosConfig(_Strict):
    model: ModelSettings = Field(default_factory=ModelSettings)
    kv_cache: KVCacheSettings = Field(default_factory=KVCacheSettings)
    scheduling: SchedulingSettings = Field(default_factory=SchedulingSettings)
    prefill: RoleSettings = Field(default_factory=RoleSettings)
    decode: RoleSettings = Field(default_factory=RoleSettings)
    ingress: RoleSettings = Field(
        default_factory=lambda: RoleSettings(num_cpus=0.1, torch_threads=1)
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    speculation: SpeculationSettings = Field(default_factory=SpeculationSettings)
    structured_outputs: StructuredOutputSettings = Field(
        default_factory=StructuredOutputSettings
    )
    tool_calling: ToolCallSettings = Field(default_factory=ToolCallSettings)

    @model_validator(mode="after")
    def _autoscaling_is_valid(self) -> InferosConfig:
        for name in ("prefill", "decode", "ingress"):
            _check_autoscaling(getattr(self, name), name)
        return self

    @model_validator(mode="after")
    def _decode_and_ingress_run(self) -> InferosConfig:
        for name in ("decode", "ingress"):
            role: RoleSettings = getattr(self, name)
            if role.num_replicas == 0 and role.autoscaling_config is None:
                raise ValueError(f"{name}.num_replicas must be at least 1")
        return self

    @model_validator(mode="after")
    def _unit_is_whole_blocks(self) -> InferosConfig:
        if self.kv_cache.quant_unit_tokens % self.kv_cache.block_size:
            raise ValueError(
                f"kv_cache.quant_unit_tokens = {self.kv_cache.quant_unit_tokens} must be a "
                f"multiple of kv_cache.block_size = {self.kv_cache.block_size}"
            )
        return self

    @model_validator(mode="after")
    def _blocks_cover_a_request(self) -> InferosConfig:
        tokens = self.kv_cache.num_blocks * self.kv_cache.block_size
        if tokens < self.model.max_model_len:
            raise ValueError(
                f"kv_cache.num_blocks * block_size = {tokens} tokens cannot hold one request of "
                f"model.max_model_len = {self.model.max_model_len}"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> InferosConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)

    def threads_for(self, role: str, num_cpus: int) -> int:
        """torch threads for `role` on a node with `num_cpus` cores: the role's setting, or
        all cores for a lone engine process, half each when prefill and decode share them
        (two OpenMP teams on the same cores stall each other at every barrier)."""
        settings: RoleSettings = getattr(self, role)
        if settings.torch_threads is not None:
            return settings.torch_threads
        if role == "ingress":
            return 1
        if self.scheduling.pd_mode == "colocated" or not self.has_prefill_replicas:
            return max(1, num_cpus)
        return max(1, num_cpus // 2)

    @property
    def model_dtype(self) -> str:
        """The weights' and activations' dtype `model.dtype` resolves to on this CPU."""
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if cpu_has_native_bf16() else "float32"

    @property
    def fast_kernels(self) -> bool:
        """The int4 path and measured dense kernels: for bfloat16 and auto, never for an
        explicit float32 (reference numerics)."""
        return self.model.dtype != "float32"

    @property
    def kv_dtype(self) -> str:
        if self.kv_cache.dtype != "auto":
            return self.kv_cache.dtype
        if self.model_dtype == "bfloat16" and not cpu_has_native_bf16():
            return "float32"
        return self.model_dtype

    @property
    def max_body_bytes(self) -> int:
        """server.max_body_bytes, or room for a full context of text as JSON with headroom
        (a request near it is refused for its length anyway: `context_length_exceeded`)."""
        return self.server.max_body_bytes or max(
            MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * self.model.max_model_len
        )

    @property
    def api_keys(self) -> list[str]:
        """server.api_key as a list (one key or several)."""
        keys = self.server.api_key
        return [keys] if isinstance(keys, str) else list(keys or [])

    @property
    def has_prefill_replicas(self) -> bool:
        return self.prefill.num_replicas > 0 or self.prefill.autoscaling_config is not None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            num_blocks=self.kv_cache.num_blocks,
            block_size=self.kv_cache.block_size,
            max_num_seqs=self.scheduling.max_num_seqs,
            max_num_batched_tokens=self.scheduling.max_num_batched_tokens,
            max_model_len=self.model.max_model_len,
            kv_dtype=self.kv_dtype,
            kv_profile=self.kv_cache.profile,
            kv_unit_tokens=self.kv_cache.quant_unit_tokens,
            kv_spill_dir=self.kv_cache.spill_dir,
            prefix_caching=self.kv_cache.prefix_reuse and self.kv_cache.enable_prefix_caching,
        )
