"""Linear layers with prepacked oneDNN weights, for CPU decode steps.

A decode step multiplies a few rows (one per running request) by every weight matrix of the
model, so on a CPU it is bound by how fast the weights stream from memory. `F.linear` hands
that to MKL's sgemm as a plain row-major matrix; on the AMD EPYC this was measured on, that
read weights at about 10 GB/s, where llama.cpp reads the same weights at ~21 GB/s. oneDNN's
matmul with the weight reordered once into its own blocked layout (what torch.compile's
freezing does to inference linears: `torch.ops.mkldnn._reorder_linear_weight` +
`_linear_pointwise`) runs SmolLM2-135M's linears in 0.6x of the time at one row and 0.5x at
16 rows (benchmarks/linear_kernels.py, BENCHMARKS.md "A decode step's matrix products").

The packed weight replaces the layer's weight, so a replica holds each weight once; a weight
another module shares (tied embeddings: the embedding layer reads it as a plain tensor) is
kept and packed beside it. The model is then for inference only: no gradients, no
state_dict round trip. Results equal F.linear's up to floating-point summation order (the
greedy answers on the benchmark prompts are the same).

    pack_linears(model, batch_hint=16)  # every nn.Linear of the model now runs prepacked
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run oneDNN's prepacked linear in `dtype`."""
    if not torch.backends.mkldnn.is_available() or dtype not in PACKED_DTYPES:
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(torch.nn.Linear):
    """An nn.Linear whose forward multiplies by a oneDNN-prepacked copy of the weight (peft's
    LoRA layers wrap it as any nn.Linear: they read its shape, dtype and device)."""

    packed: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.to(self.packed.dtype), self.packed, self.bias, "none", [], ""
        )


def pack_linears(model: torch.nn.Module, batch_hint: int) -> int:
    """Make every CPU nn.Linear of the model a PackedLinear, packed for `batch_hint` rows (the
    deployment's batch: oneDNN picks its blocking for it, any row count works). The number of
    layers packed; 0 where oneDNN cannot run the model's dtype (fp16, no bf16 in the CPU)."""
    model.requires_grad_(False)
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m.weight.device.type == "cpu"
        and available(m.weight.dtype)
    ]
    packing, linear_weights = {id(m) for m in layers}, {id(m.weight) for m in layers}
    shared = {
        id(p)
        for m in model.modules()
        if id(m) not in packing
        for p in m.parameters(recurse=False)
        if id(p) in linear_weights
    }
    if layers and not _packs(layers[0], batch_hint):
        return 0
    with torch.no_grad():
        for layer in layers:
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), batch_hint)
            layer.packed = packed
            if id(layer.weight) not in shared:
                layer.weight = torch.nn.Parameter(packed, requires_grad=False)
            layer.__class__ = PackedLinear
    log.info(
        "%d linear layers prepacked for oneDNN (batch hint %d; %d weights shared, kept)",
        len(layers),
        batch_hint,
        len(shared),
    )
    return len(layers)


def _packs(layer: torch.nn.Linear, batch_hint: int) -> bool:
    """Whether this build's oneDNN packs and multiplies like F.linear (tried on one layer
    before any is changed: a CPU or build without the kernel keeps the plain model)."""
    x = torch.randn(2, layer.in_features, dtype=layer.weight.dtype)
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), batch_hint)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    except RuntimeError as exc:
        log.warning("linear layers not prepacked: oneDNN failed on %s (%s)", layer, exc)
        return False
    tolerance = 1e-3 if layer.weight.dtype == torch.float32 else 5e-2
    if not torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance):
        log.warning("linear layers not prepacked: oneDNN's result differs from F.linear's")
        return False
    return True
