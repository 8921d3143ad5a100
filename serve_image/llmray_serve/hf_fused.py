"""Fewer, longer matrix products per decoder layer, for CPU decode steps.

A Llama-family layer multiplies the same input by q_proj, k_proj and v_proj, and by gate_proj
and up_proj: concatenated along their outputs, a layer runs 4 products (qkv, o, gate_up,
down) instead of 7. A decode step of a small model is many small products (SmolLM2-135M:
k_proj and v_proj are 576x192); each pays oneDNN's and torch's per-call cost, and a longer
weight streams better (BENCHMARKS.md "A decode step's matrix products").

Applied before pack_linears (hf_packed.py), so the fused layers are prepacked like any other;
the fused layer replaces the separate ones (each weight is held once). Not with LoRA
adapters: peft wraps the per-projection layers by name (q_proj, v_proj, ...), which are gone
here. Only the attention and MLP classes whose forward is known (ATTENTION, MLP) are fused;
another model keeps its layers. Results equal the separate products' up to floating-point
summation order.

    fuse_projections(model)  # -> number of modules fused, e.g. 60 for SmolLM2-135M
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# Attention classes whose forward is Llama's (transformers 5.23) but for the sliding window it
# passes to the attention function: class name -> that window, read from the module.
ATTENTION: dict[str, Callable[[Any], dict[str, Any]]] = {
    "LlamaAttention": lambda m: {},
    "Qwen2Attention": lambda m: {"sliding_window": m.sliding_window},
    "MistralAttention": lambda m: {"sliding_window": getattr(m.config, "sliding_window", None)},
}
MLP = ("LlamaMLP", "Qwen2MLP", "MistralMLP")  # down(act(gate(x)) * up(x))


def fuse_projections(model: torch.nn.Module) -> int:
    """Concatenate each known attention's q/k/v and each known MLP's gate/up into one linear
    layer (`qkv_proj`, `gate_up_proj`), in place; the number of modules changed."""
    fused = 0
    with torch.no_grad():
        for module in model.modules():
            name = type(module).__name__
            if name in ATTENTION and _same_input(module, ("q_proj", "k_proj", "v_proj")):
                module.qkv_proj = _concatenated(module, ("q_proj", "k_proj", "v_proj"))
                module.__class__ = _subclass(type(module), _attention_forward)
                fused += 1
            elif name in MLP and _same_input(module, ("gate_proj", "up_proj")):
                module.gate_up_proj = _concatenated(module, ("gate_proj", "up_proj"))
                module.__class__ = _subclass(type(module), _mlp_forward)
                fused += 1
    if fused:
        log.info("%d attention and MLP modules run fused projections (qkv, gate_up)", fused)
    return fused


def _same_input(module: torch.nn.Module, names: tuple[str, ...]) -> bool:
    """Whether the layers are plain nn.Linear of one input size, dtype, device and bias use."""
    layers = [getattr(module, n, None) for n in names]
    if not all(type(m) is torch.nn.Linear for m in layers):
        return False
    first = layers[0]
    return all(
        m.in_features == first.in_features
        and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device
        and (m.bias is None) == (first.bias is None)
        for m in layers
    )


def _concatenated(module: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Linear:
    layers = [getattr(module, n) for n in names]
    for n in names:
        delattr(module, n)
    weight = torch.cat([m.weight for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    fused.split_sizes = [m.out_features for m in layers]
    return fused


_SUBCLASSES: dict[type, type] = {}


def _subclass(cls: type, forward: Callable[..., Any]) -> type:
    """`cls` with the fused forward (made once per class; the module keeps its other
    attributes and its class name's prefix, so isinstance checks still hold)."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward})
    return _SUBCLASSES[cls]


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # LlamaAttention.forward (transformers 5.23) with one product for q, k and v.
    modeling = sys.modules[type(self).__mro__[1].__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    q, k, v = self.qkv_proj(hidden_states).split(self.qkv_proj.split_sizes, dim=-1)
    query_states = q.view(hidden_shape).transpose(1, 2)
    key_states = k.view(hidden_shape).transpose(1, 2)
    value_states = v.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = modeling.apply_rotary_pos_emb(query_states, key_states, cos, sin)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **ATTENTION[type(self).__mro__[1].__name__](self),
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).split(self.gate_up_proj.split_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
