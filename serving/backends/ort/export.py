"""The model's decode step as an ONNX graph, exported once per model and cached on disk.

Our torch model attends through a paged pool, which torch.onnx.export cannot trace; the
exported graph is a dense step over the same weights instead:

  inputs   input_ids     int64 [B, T]        new tokens (T = 1 in decode, the prompt in prefill)
           position_ids  int64 [B, T]
           past_mask     bool  [B, P]            True where a past slot holds context
           past.{i}.key / past.{i}.value  float32 [B, P, Hkv, D]  cached context, token-major
  outputs  logits        float32 [B, V]      at each row's last new token
           present.{i}.key / present.{i}.value  float32 [B, T, Hkv, D]  the new tokens' K/V

Past K/V are token-major, like our KV block (`[block_size, Hkv, D]` per layer and half), so
the runner fills them with one gather from its pool; "present" holds only the new tokens
(the runner's pool already has the past, so returning the whole concatenation would copy
it out again every step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from serving.env import inferos_home
from serving.models.llama import LlamaForCausalLM
from serving.models.rope import apply_rope

logger = logging.getLogger(__name__)

# Bump when the graph's inputs, outputs or maths change: old caches are then ignored.
EXPORT_VERSION = 1
GRAPH_FILE = "decode_step.onnx"


def input_names(num_layers: int) -> list[str]:
    past = [f"past.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "position_ids", "past_mask", *past]


def output_names(num_layers: int) -> list[str]:
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["logits", *present]


class DenseDecodeStep(nn.Module):
    """The decoder over dense past K/V, sharing the weights of a loaded `LlamaForCausalLM`."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model
        arch = model.arch
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
        )
        self.group = self.num_heads // self.num_kv_heads

    def _attention(
        self,
        layer: nn.Module,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, T, 1, D]
        sin: torch.Tensor,
        mask: torch.Tensor,  # [B, T, P+T]
        past_k: torch.Tensor,  # [B, P, Hkv, D]
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        b, t, _ = x.shape
        hkv, g, d = self.num_kv_heads, self.group, self.head_dim
        q, k, v = attn.qkv_proj(x).split(attn.split_sizes, dim=-1)
        q = apply_rope(q.view(b, t, self.num_heads, d), cos, sin)
        k = apply_rope(k.view(b, t, hkv, d), cos, sin)
        v = v.view(b, t, hkv, d)
        keys = torch.cat([past_k, k], dim=1).transpose(1, 2)  # [B, Hkv, S, D]
        values = torch.cat([past_v, v], dim=1).transpose(1, 2)
        # GQA without repeating K/V: the g query heads of a KV head become g*T query rows.
        qg = q.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * attn.scale  # [B, Hkv, g*T, S]
        s = mask.shape[-1]
        row_mask = mask[:, None, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
        scores = scores.masked_fill(~row_mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [B, Hkv, g*T, D]
        out = out.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, -1)
        return attn.o_proj(out), k, v

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_mask: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        b, t = input_ids.shape
        x = m.embed_tokens(input_ids)
        # new token j sees every valid past slot and the new tokens up to itself
        steps = torch.arange(t, device=input_ids.device)
        causal = (steps[None, :] <= steps[:, None]).expand(b, t, t)
        mask = torch.cat([past_mask[:, None, :].expand(b, t, past_mask.shape[1]), causal], -1)
        cos = m.rope_cos[position_ids].unsqueeze(2).to(x.dtype)  # [B, T, 1, D]
        sin = m.rope_sin[position_ids].unsqueeze(2).to(x.dtype)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(m.layers):
            h, k, v = self._attention(
                layer, layer.input_layernorm(x), cos, sin, mask, past[2 * i], past[2 * i + 1]
            )
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            present += [k, v]
        logits = m.lm_head(m.norm(x[:, -1])).float()  # [B, V]
        return (logits, *present)


def _cache_key(folder: Path, max_positions: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{EXPORT_VERSION} torch{torch.__version__} pos{max_positions}".encode())
    h.update((folder / "config.json").read_bytes())
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_dir(folder: Path, max_positions: int) -> Path:
    return inferos_home() / "onnx" / f"{folder.name}-{_cache_key(folder, max_positions)}"


def export_decode_step(model: LlamaForCausalLM, path: Path) -> None:
    """Trace `DenseDecodeStep(model)` (float32) into `path` with dynamic B, T and P."""
    arch = model.arch
    step = DenseDecodeStep(model).eval()
    b, t, p = 2, 3, 5
    past = [torch.zeros(b, p, arch.num_kv_heads, arch.head_dim) for _ in range(2 * arch.num_layers)]
    args = (
        torch.zeros(b, t, dtype=torch.long),
        torch.arange(p, p + t).repeat(b, 1),
        torch.ones(b, p, dtype=torch.bool),
        past,
    )
    batch, new, ctx = (torch.export.Dim(n) for n in ("batch", "new", "ctx"))
    dynamic_shapes = (
        {0: batch, 1: new},
        {0: batch, 1: new},
        {0: batch, 1: ctx},
        [{0: batch, 1: ctx} for _ in past],
    )
    with torch.no_grad():
        torch.onnx.export(
            step,
            args,
            str(path),
            input_names=input_names(arch.num_layers),
            output_names=output_names(arch.num_layers),
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            optimize=True,
        )


def ensure_exported(folder: Path, max_positions: int) -> Path:
    """Path of the cached decode-step graph for the model in `folder`; exports it the first
    time (tens of seconds). Concurrent replicas each export into a temporary folder and
    the first rename wins, so a reader never sees a half-written file."""
    from serving.models.arch import LlamaArch
    from serving.models.loader import load_model

    # the graph is Llama's (full rotary, gated MLP): other families fail here, before export
    LlamaArch.from_folder(folder)
    target = cache_dir(folder, max_positions)
    graph = target / GRAPH_FILE
    if graph.exists():
        return graph
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("exporting the decode step of %s to ONNX (once per model)", folder.name)
    model = load_model(folder, torch.float32, max_positions=max_positions)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        export_decode_step(model, tmp / GRAPH_FILE)
        (tmp / "meta.json").write_text(
            json.dumps({"model": folder.name, "export_version": EXPORT_VERSION})
        )
        try:
            os.rename(tmp, target)
        except OSError:  # another replica finished first
            if not graph.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("ONNX decode step cached at %s", graph)
    return graph
