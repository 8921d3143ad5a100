"""A compiled one-request decode step for CPU: `spec.compileDecode`.

A single stream's decode step multiplies one row by every weight matrix of the model. In
eager PyTorch on CPU those products run at a fraction of the memory bandwidth (MKL's sgemm,
or oneDNN's prepacked matmul in hf_packed.py), and the hundreds of small ops around them
(norms, rotary, residuals) each pay a dispatch. Inductor's C++ GEMM template (torch.compile
with freezing and max-autotune) packs each weight into its own blocked layout and streams it
at close to the machine's bandwidth: SmolLM2-135M's 121 fused products took 10.6-14.4 ms per
one-row pass against ~29 ms prepacked (BENCHMARKS.md, "A compiled decode step").

The step is one inductor graph over the whole model, for steps of exactly one token (one
request decoding alone, or a one-token prompt): the embedding, each layer's norms, fused
q/k/v and gate/up products (hf_fused.py), rotary and residuals, the final norm and the lm
head. Attention stays transformers' own over its paged KV cache (the cache is written in
place through views a graph cannot hold): it is an opaque custom op (`llmray::attention`)
that reads the step's cache arguments from the generation thread. Every other step (a
prefill, several requests, a prompt scored for echo) runs the eager model as before.

The costs, why it is opt-in: the first step compiles (about a minute for SmolLM2-135M on 2
cores; the replica reports ready after it), and the compiled graph holds its own packed copy
of the linear weights beside the eager model's. Llama-family models whose attention and MLP
hf_fused.py fuses, full attention in every layer (no sliding window), float32 (in bfloat16
it was measured no faster than the eager step); another model runs eagerly, with a warning.

    step = CompiledDecode.of(model)   # before pack_linears: it keeps the dense weights
    step.install(model)               # model(...) now runs one-token steps compiled
"""

from __future__ import annotations

import functools
import logging
import threading
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The inductor settings that make the products fast: constants folded into the graph
# (freezing), the C++ GEMM template tried against ATen's (max-autotune), and the graph's
# copy of the dense weights dropped once it holds its own packed ones.
INDUCTOR_OPTIONS = {
    "freezing": True,
    "freezing_discard_parameters": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
}
# float32 only: in bfloat16 (avx512_bf16, SmolLM2-135M) the compiled step was measured no
# faster than the eager prepacked one (19.5-24 against 22-24 ms per token).
COMPILED_DTYPES = (torch.float32,)
# The batch arguments that are not the attention's (the graph takes ids, positions, rows).
_NOT_ATTENTION = {
    "input_ids",
    "position_ids",
    "attention_mask",
    "logits_to_keep",
    "logits_indices",
    "logits_processor_args",
    "use_cache",
}

_step = threading.local()  # the running step's attention arguments (generation thread)


@torch.library.custom_op("llmray::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """transformers' SDPA attention of one layer over the paged cache it writes k and v to;
    q, k, v: [1, heads, tokens, head_dim]; the result: [1, tokens, heads * head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, mask, kwargs = _step.layers[layer], _step.mask, _step.kwargs
    out, _ = sdpa_attention_forward(
        module, q, k, v, mask, dropout=0.0, scaling=module.scaling, **kwargs
    )
    return out.reshape(1, q.shape[2], -1)


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return q.new_empty(1, q.shape[2], q.shape[1] * q.shape[3])


def why_not(model: Any) -> str | None:
    """Why this model's decode step cannot be compiled here, or None."""
    config = model.config
    if type(model).__name__ not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        return f"{type(model).__name__} is not a Llama-family model"
    if model.dtype not in COMPILED_DTYPES:
        return f"{model.dtype}: only float32 runs faster compiled (bfloat16 did not)"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act} is not silu"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "some layers use sliding-window attention"
    if getattr(config, "use_sliding_window", False):
        return "the model uses sliding-window attention"
    layers = model.model.layers
    if not all(
        hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")
        for layer in layers
    ):
        return "its projections are not fused (hf_fused.py; not with LoRA adapters)"
    return None


class CompiledDecode(torch.nn.Module):
    """The model's one-token step as a function of its own weights (no transformers module
    inside the graph, so freezing discards only this module's copies)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        inner = model.model
        # Plain lists, not submodules: they run outside the graph (rotary, eagerly, before
        # it; the attentions inside the custom op), and freezing leaves their tensors alone.
        self.rotary = [inner.rotary_emb]
        self.attention_modules = [layer.self_attn for layer in inner.layers]
        first = self.attention_modules[0]
        self.head_dim = first.head_dim
        self.eps = [
            (
                layer.input_layernorm.variance_epsilon,
                layer.post_attention_layernorm.variance_epsilon,
            )
            for layer in inner.layers
        ]
        self.final_eps = inner.norm.variance_epsilon
        weights = {"embed": inner.embed_tokens.weight, "final_norm": inner.norm.weight}
        weights["lm_head"] = model.lm_head.weight
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            weights.update(
                {
                    f"l{i}_in_norm": layer.input_layernorm.weight,
                    f"l{i}_post_norm": layer.post_attention_layernorm.weight,
                    f"l{i}_qkv": attn.qkv_proj.weight,
                    f"l{i}_o": attn.o_proj.weight,
                    f"l{i}_gate_up": mlp.gate_up_proj.weight,
                    f"l{i}_down": mlp.down_proj.weight,
                }
            )
            for name, bias in (
                ("qkv", attn.qkv_proj.bias),
                ("o", attn.o_proj.bias),
                ("gate_up", mlp.gate_up_proj.bias),
                ("down", mlp.down_proj.bias),
            ):
                if bias is not None:
                    weights[f"l{i}_{name}_bias"] = bias
        # New Parameter objects over the same storage: freezing replaces this module's
        # attributes, never the model's (the eager model keeps running prefills).
        for name, tensor in weights.items():
            self.register_parameter(name, torch.nn.Parameter(tensor.detach(), requires_grad=False))
        self.splits = [first.qkv_proj.split_sizes, inner.layers[0].mlp.gate_up_proj.split_sizes]
        self.layers = len(inner.layers)
        # (In __dict__: as a submodule of itself, the module would recurse in repr.)
        self.__dict__["compiled"] = torch.compile(self, dynamic=False)
        self.steps = 0  # one-token steps run compiled
        self.failed = ""  # why the first step did not compile (it then runs eagerly)

    @classmethod
    def of(cls, model: Any) -> CompiledDecode | None:
        """The compiled step for `model` (fused, not yet packed), or None with a warning."""
        if reason := why_not(model):
            log.warning("compileDecode: the decode step runs eagerly: %s", reason)
            return None
        return cls(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)
        tokens = input_ids.shape[1]
        qkv_split, gate_up_split = self.splits
        for i in range(self.layers):
            eps_in, eps_post = self.eps[i]
            x = _rms_norm(h, getattr(self, f"l{i}_in_norm"), eps_in)
            q, k, v = self._linear(x, i, "qkv").split(qkv_split, dim=-1)
            q, k, v = (t.view(1, tokens, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            h = h + self._linear(torch.ops.llmray.attention(q, k, v, i), i, "o")
            x = _rms_norm(h, getattr(self, f"l{i}_post_norm"), eps_post)
            gate, up = self._linear(x, i, "gate_up").split(gate_up_split, dim=-1)
            h = h + self._linear(F.silu(gate) * up, i, "down")
        h = _rms_norm(h[:, keep, :], self.final_norm, self.final_eps)
        return F.linear(h, self.lm_head)

    def _linear(self, x: torch.Tensor, layer: int, name: str) -> torch.Tensor:
        return F.linear(
            x, getattr(self, f"l{layer}_{name}"), getattr(self, f"l{layer}_{name}_bias", None)
        )

    def install(self, model: Any) -> None:
        """Run the model's one-token continuous-batching steps through the compiled graph."""
        eager_forward = model.forward
        rotary, embed = self.rotary[0], model.model.embed_tokens

        # logits_to_keep in the signature: transformers' batching manager then passes the
        # rows whose logits it reads (and slices nothing itself).
        def forward(
            input_ids: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            logits_to_keep: Any = 0,
            **kwargs: Any,
        ) -> Any:
            eager = functools.partial(
                eager_forward,
                input_ids=input_ids,
                position_ids=position_ids,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
            if self.failed or not _one_token_step(input_ids, logits_to_keep, kwargs):
                return eager()
            _step.layers, _step.mask = self.attention_modules, kwargs.get("attention_mask")
            _step.kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_ATTENTION}
            try:
                # The settings as a config patch around each call: passed as torch.compile's
                # `options`, torch 2.13 compiled without freezing (40 ms per step, not 16).
                with torch.no_grad(), torch._inductor.config.patch(INDUCTOR_OPTIONS):
                    cos, sin = rotary(embed.weight[:1], position_ids)  # reads its dtype
                    logits = self.compiled(input_ids, cos, sin, logits_to_keep)
            except Exception as exc:
                if self.steps:  # it compiled and ran before: a real failure of the step
                    raise
                # The first call compiles: no C++ compiler in the image, an inductor bug.
                log.warning("compileDecode: the step did not compile, it runs eagerly: %s", exc)
                self.failed = f"{type(exc).__name__}: {exc}"
                self._parameters.clear()  # let the dense copies go
                return eager()
            self.steps += 1
            return SimpleNamespace(logits=logits)

        forward.compiled = self  # type: ignore[attr-defined]  # (not a submodule of the model)
        model.forward = forward


def _one_token_step(input_ids: Any, keep: Any, kwargs: dict[str, Any]) -> bool:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    return (
        isinstance(kwargs.get("cache"), PagedAttentionCache)
        and kwargs.get("block_table") is None
        and input_ids is not None
        and tuple(input_ids.shape) == (1, 1)
        and torch.is_tensor(keep)
        and tuple(keep.shape) == (1,)
    )


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm: in float32, then back to the input's dtype before the weight.
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # apply_rotary_pos_emb of Llama: cos and sin are [1, tokens, head_dim].
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
