"""``decoder.onnx``: a Qwen2 forward over explicit tensors, declared once and exported lean.

The graph is traced from :class:`QwenDecoder` built on the meta device, so tracing holds no
weights; ``_attach_weights`` then points every initializer at the source model's tensor
through a lazy tensor, which the ONNX writer materialises (transposed to ``(in, out)``) one
at a time while it streams the external data file. Peak memory is the source model plus
the largest single weight.

Inputs: ``inputs_embeds`` (1, n, width) f32, ``position_ids`` (1, n) i64 (they continue
after the cached prefix), ``past_key_values.{i}.key|value`` (1, kv_heads, past, head_dim)
f32 with ``past >= 0``. Outputs: ``logits`` (vocab,) of the last position only,
``hidden_states`` (1, n, width) after the final norm, ``present.{i}.key|value``
(1, kv_heads, past + n, head_dim).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import Tensor, nn

from loc3r.export.llm_io import DecoderSpec
from loc3r.models.config import LLMConfig

OPSET = 18


class _Linear(nn.Module):
    """``x @ weight + bias`` with ``weight`` stored ``(in, out)``: a plain ONNX MatMul."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class _RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        width, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        self.q_proj = _Linear(width, self.heads * d, True)
        self.k_proj = _Linear(width, self.kv_heads * d, True)
        self.v_proj = _Linear(width, self.kv_heads * d, True)
        self.o_proj = _Linear(self.heads * d, width, False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, d = x.shape[1], self.head_dim
        q = self.q_proj(x).view(1, n, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(1, n, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(1, n, self.kv_heads, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        group = self.heads // self.kv_heads
        k_all = k.unsqueeze(2).expand(1, self.kv_heads, group, k.shape[2], d).reshape(
            1, self.heads, k.shape[2], d
        )
        v_all = v.unsqueeze(2).expand(1, self.kv_heads, group, v.shape[2], d).reshape(
            1, self.heads, v.shape[2], d
        )
        scores = (q @ k_all.transpose(-1, -2)) * (d**-0.5) + mask
        out = torch.softmax(scores, dim=-1) @ v_all
        return self.o_proj(out.transpose(1, 2).reshape(1, n, self.heads * d)), k, v


class _MLP(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        width, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = _Linear(width, inner, False)
        self.up_proj = _Linear(width, inner, False)
        self.down_proj = _Linear(inner, width, False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(config)
        self.mlp = _MLP(config)
        self.input_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)


class _Body(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)


class QwenDecoder(nn.Module):
    """Qwen2 over explicit tensors; parameter names are those of ``Qwen2ForCausalLM``."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.model = _Body(config)
        self.lm_head = _Linear(config.hidden_size, config.vocab_size, False)
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta

    def forward(
        self, inputs_embeds: Tensor, position_ids: Tensor, past: list[Tensor]
    ) -> tuple[Tensor, ...]:
        x = inputs_embeds
        n, past_len = x.shape[1], past[0].shape[2]
        d = self.head_dim
        exponent = torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d
        inv_freq = 1.0 / self.rope_theta**exponent
        angles = position_ids.to(torch.float32)[0, :, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        query_pos = torch.arange(n, device=x.device) + past_len
        key_pos = torch.arange(past_len + n, device=x.device)
        blocked = key_pos[None, :] > query_pos[:, None]
        mask = torch.where(blocked, float("-inf"), 0.0).to(torch.float32)
        presents: list[Tensor] = []
        for i, layer in enumerate(self.model.layers):
            attn, k, v = layer.self_attn(
                layer.input_layernorm(x), cos, sin, mask, past[2 * i], past[2 * i + 1]
            )
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            presents += [k, v]
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden[0, -1])
        return (logits, hidden, *presents)


def export_graph(config: LLMConfig, state: Mapping[str, Tensor]) -> tuple[ir.Model, list[str]]:
    """Trace :class:`QwenDecoder` on the meta device, point it at ``state``, optimize.

    Returns the graph (weights still lazy) and the names of its MatMul weights.
    """
    spec = DecoderSpec.from_config(config)
    with torch.device("meta"):
        wrapper = QwenDecoder(config).eval()
        embeds = torch.zeros(1, 3, spec.width)
        positions = torch.zeros(1, 3, dtype=torch.long)
        past = [torch.zeros(1, spec.kv_heads, 2, spec.head_dim) for _ in range(2 * spec.layers)]
    n, past_len = torch.export.Dim("n", min=1), torch.export.Dim("past", min=0)
    dynamic = ({1: n}, {1: n}, [{2: past_len}] * (2 * spec.layers))
    program = torch.onnx.export(
        wrapper,
        (embeds, positions, past),
        dynamo=True,
        dynamic_shapes=dynamic,
        input_names=spec.input_names,
        output_names=spec.output_names,
        opset_version=OPSET,
        optimize=False,
        verbose=False,
    )
    matmul_weights = _attach_weights(program.model, state)
    onnxscript.optimizer.optimize(program.model)
    return program.model, matmul_weights


def _source_array(tensor: Tensor, transpose: bool) -> ir.Tensor:
    array = tensor.detach().to(torch.float32)
    array = array.T.contiguous() if transpose else array
    return ir.tensor(np.asarray(array.numpy()))


def _attach_weights(graph_model: ir.Model, state: Mapping[str, Tensor]) -> list[str]:
    """Point each weight initializer at ``state`` lazily; returns the MatMul weight names."""
    matmul_names = []
    for name, value in graph_model.graph.initializers.items():
        if name not in state:
            continue
        source = state[name]
        transpose = source.dim() == 2
        if transpose:
            matmul_names.append(name)
        shape = ir.Shape(tuple(reversed(source.shape)) if transpose else tuple(source.shape))
        value.const_value = ir.LazyTensor(
            lambda s=source, t=transpose: _source_array(s, t), ir.DataType.FLOAT, shape, name=name
        )
    return matmul_names
