"""The serving precision: which dtype `spec.dtype` means on the replica's hardware.

`auto` (the default) is bfloat16 only where the hardware computes it natively, float32
elsewhere: measured on CPUs without bf16 instructions (AVX2-only EPYCs), bf16 ran 10-20x
slower than fp32 (the arithmetic is emulated), and on Xeons with AMX it ran faster. GPUs have
bf16 (float16 where a CUDA GPU lacks it). The transformers engine's experimental int8 (dynamic
int8 Linear layers, CPU only; not a spec field: it failed the quality check, BENCHMARKS.md)
keeps its activations in float32, so it runs in float32. Pure: the CPU's
flags are read by the caller (`read_cpu_flags`), so a test passes any flags it likes.

    resolve_dtype("auto", device_type="cpu", native_bf16=cpu_native_bf16({"avx2"}))
    -> Resolved(dtype="float32", reason="auto: this CPU has no native bf16 (no AMX, ...)")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# spec.dtype, e.g. dtype: bfloat16; auto: bfloat16 where native, else float32.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# The transformers engine's `quantization` (benchmarks/serve_precision.py): none | int8.
Quantization = Literal["none", "int8"]
DTYPE_DEFAULT = "auto"
QUANTIZATION_DEFAULT = "none"
# Linux /proc/cpuinfo flags of bf16 arithmetic in hardware: AMX's bf16 tiles (Sapphire Rapids
# and later Xeons) and AVX-512 BF16 (Cooper Lake, Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Resolved:
    dtype: str  # float32 | bfloat16 | float16 (torch's names, torch.<dtype>)
    reason: str  # why, for the log: "auto: the CPU has native bf16 (avx512_bf16)"


def cpu_bf16_flags(flags: Iterable[str]) -> tuple[str, ...]:
    """The bf16 hardware flags among a CPU's flags, e.g. ("amx_bf16",); () when it has none."""
    have = set(flags)
    return tuple(f for f in BF16_CPU_FLAGS if f in have)


def read_cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU flags Linux reports (the first processor's `flags` line); empty elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def resolve_dtype(
    requested: str,
    *,
    device_type: str,
    native_bf16: bool,
    bf16_flags: tuple[str, ...] = (),
    quantization: str = QUANTIZATION_DEFAULT,
) -> Resolved:
    """`spec.dtype` on this device. `native_bf16`: the device computes bf16 in hardware (a
    CPU with one of BF16_CPU_FLAGS that torch also sees; a GPU that supports it);
    `bf16_flags` only names those flags in the reason."""
    if requested != "auto":
        return Resolved(requested, f"spec.dtype {requested}")
    if quantization == "int8":
        return Resolved("float32", "auto with quantization int8: int8 weights, fp32 activations")
    if device_type == "cpu":
        if native_bf16:
            names = ", ".join(bf16_flags) or "bf16"
            return Resolved("bfloat16", f"auto: the CPU has native bf16 ({names})")
        return Resolved("float32", "auto: this CPU has no native bf16 (no AMX or AVX-512 BF16)")
    if native_bf16:
        return Resolved("bfloat16", f"auto: the {device_type} device supports bf16")
    return Resolved("float16", f"auto: the {device_type} device has no bf16, float16 instead")
