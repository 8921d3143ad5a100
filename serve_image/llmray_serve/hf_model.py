"""The transformers engine's model, loaded in the precision the spec asks for.

`spec.dtype` (auto: bfloat16 only where the device computes it natively, llmray.precision)
and IPEX's optimize, in one place; the engine reports the result (`Precision`) in
/v1/models, its log and a metric. `quantization="int8"` (torch's dynamic int8 Linear layers:
int8 weights, activations quantized per step, CPU only) is an experiment, not a spec field:
on SmolLM2-135M it nearly doubled the held-out perplexity and changed every greedy answer
(BENCHMARKS.md, benchmarks/serve_precision.py).

    model, precision = load_model("models/tiny", device="cpu", dtype="auto")
    precision -> Precision(dtype="float32", quantization="none", reason="auto: this CPU ...")
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from llmray import precision as precisions
from llmray_serve import hf_compiled, hf_fused, hf_packed

log = logging.getLogger(__name__)

IPEX_HELP = (
    "compute.ipex: true needs Intel Extension for PyTorch 2.8, which requires torch 2.8.* "
    "(see docs/ipex.md)"
)


@dataclass(frozen=True)
class Precision:
    dtype: str  # float32 | bfloat16 | float16
    quantization: str  # none | int8
    reason: str  # why this dtype, e.g. "auto: the CPU has native bf16 (amx_bf16)"

    def details(self) -> dict[str, str]:
        """What /v1/models adds to the model object, e.g. {"dtype": "bfloat16", ...}."""
        return {"dtype": self.dtype, "quantization": self.quantization}


def resolve(device: str, dtype: str, quantization: str) -> precisions.Resolved:
    """spec.dtype on this machine's device (the replica's node: detected here, never
    assumed from the spec)."""
    native, flags = native_bf16(device)
    return precisions.resolve_dtype(
        dtype,
        device_type=device.split(":")[0],
        native_bf16=native,
        bf16_flags=flags,
        quantization=quantization,
    )


def native_bf16(device: str) -> tuple[bool, tuple[str, ...]]:
    """Whether the device computes bf16 in hardware, and the CPU flags that say so."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported(), ()
    if device.startswith("xpu"):
        return True, ()  # every Intel GPU torch's XPU build runs on has bf16
    flags = precisions.cpu_bf16_flags(precisions.read_cpu_flags())
    # The kernel lists what the CPU has; torch (its cpuinfo library) also checks that the OS
    # enabled it (AMX tiles need the kernel's permission): bf16 only where both say so.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    torch_sees = bool(amx is not None and amx()) or bool(avx512_bf16 and avx512_bf16())
    return bool(flags) and torch_sees, flags


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = precisions.DTYPE_DEFAULT,
    quantization: str = precisions.QUANTIZATION_DEFAULT,
    ipex: bool = False,
    packed_batch: int = 0,
    fuse: bool = False,
    compile_decode: bool = False,
) -> tuple[Any, Precision]:
    """The model on `device`, in eval mode, and the precision it runs in. With
    `packed_batch` (the decode batch), a CPU model's linear layers run on oneDNN-prepacked
    weights (hf_packed.py), and with `fuse` too, a Llama-family layer's q/k/v and gate/up
    projections run as one product each (hf_fused.py; not with LoRA adapters, which wrap the
    separate projections): the model is then for inference only. `compile_decode`
    (spec.compileDecode, fused models only): one-token steps run as one compiled graph
    (hf_compiled.py; compiled at the first such step)."""
    resolved = resolve(device, dtype, quantization)
    torch_dtype = getattr(torch, resolved.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, attn_implementation="sdpa"
    )
    model = model.to(device).eval()
    if quantization == "int8":
        quantize_int8(model)
    elif packed_batch and device == "cpu" and not ipex:
        if fuse and hf_packed.available(torch_dtype):
            hf_fused.fuse_projections(model)
        # Before packing: it takes the dense weights (None, with the reason logged, where
        # the model cannot be compiled, e.g. unfused for adapters).
        compiled = hf_compiled.CompiledDecode.of(model) if compile_decode else None
        hf_packed.pack_linears(model, packed_batch)
        if compiled is not None:
            compiled.install(model)
    if ipex:
        try:
            import intel_extension_for_pytorch as ipex_mod  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RuntimeError(f"{IPEX_HELP}; import failed: {exc}") from exc
        model = ipex_mod.optimize(model, dtype=torch_dtype)
    result = Precision(resolved.dtype, quantization, resolved.reason)
    log.info(
        "model %s runs in %s, quantization %s (%s)",
        model_dir,
        result.dtype,
        result.quantization,
        result.reason,
    )
    return model, result


def quantize_int8(model: Any) -> None:
    """Dynamic int8 in place: every Linear layer of the decoder (int8 weights, per output
    channel; activations quantized per step), the lm head kept in float32 (it shares its
    weights with the embeddings, and the next token is read from its logits)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not installed here); its
        # eager dynamic quantization still works in torch 2.13.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(
            model.base_model,
            {torch.nn.Linear: per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
