"""Hardware specifics in one place: device, process-group backend, threads, precision, IPEX.

Chosen from the spec (`compute.accelerator`, `compute.ipex`, `hyperparameters.precision`),
never from optional imports swallowed by a bare `except`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

IPEX_HELP = (
    "compute.ipex: true needs Intel Extension for PyTorch, whose last release (2.8) requires "
    "torch 2.8.*: install it in its own environment with `pip install 'llmray[train,ipex]'` "
    "(see docs/ipex.md) or use the Intel trainer image"
)


@dataclass(frozen=True)
class Hardware:
    accelerator: str  # cpu | nvidia-gpu | intel-gpu
    device_type: str  # cpu | cuda | xpu
    dist_backend: str  # gloo | nccl | xccl / ccl
    ipex: bool
    use_gpu: bool  # Ray ScalingConfig(use_gpu=...)


def select_hardware(accelerator: str, ipex: bool) -> Hardware:
    if accelerator == "nvidia-gpu":
        return Hardware(accelerator, "cuda", "nccl", False, True)
    if accelerator == "intel-gpu":
        # oneCCL bindings register "ccl"; torch >= 2.8 also ships "xccl" for XPU.
        return Hardware(accelerator, "xpu", "ccl" if ipex else "xccl", ipex, False)
    return Hardware(accelerator, "cpu", "gloo", ipex, False)


def worker_env(hw: Hardware, strategy: str, threads: int) -> dict[str, str]:
    """Environment for every worker process, set before torch / deepspeed import.

    Oversubscribed threads made one measured run 11x slower: pin OMP to the worker's cores.
    """
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if strategy == "deepspeed":
        # DeepSpeed picks its accelerator at import: without this it probes for CUDA.
        env["DS_ACCELERATOR"] = {"cuda": "cuda", "xpu": "xpu"}.get(hw.device_type, "cpu")
    if hw.ipex:
        # oneCCL (Intel's collectives) reads these; one worker per socket is the usual layout.
        env.setdefault("CCL_WORKER_COUNT", "1")
        env.setdefault("CCL_ATL_TRANSPORT", "ofi")
    return env


def pin_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 hardware (AMX, AVX-512 BF16); else bf16 is emulated and slow."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(avx512_bf16 is not None and avx512_bf16())


def check_precision(hw: Hardware, precision: str) -> None:
    if precision == "bf16" and hw.device_type == "cpu" and not cpu_has_bf16():
        log.warning(
            "hyperparameters.precision bf16 on a CPU without bf16 hardware (no AMX / "
            "AVX-512 BF16): measured ~10x slower than fp32 on such CPUs; consider fp32"
        )


def autocast(hw: Hardware, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=hw.device_type, dtype=dtype)


def import_ipex() -> Any:
    """The IPEX module, or a clear error naming the versions needed."""
    try:
        import intel_extension_for_pytorch as ipex  # type: ignore[import-not-found]
    except ImportError as exc:
        import torch

        raise RuntimeError(
            f"{IPEX_HELP} (this environment has torch {torch.__version__}; import failed: {exc})"
        ) from exc
    return ipex


def ipex_optimize(
    model: Any, optimizer: Any, precision: str, *, deepspeed: bool = False
) -> tuple[Any, Any]:
    """`ipex.optimize` for training: fused optimizer, oneDNN weight layouts, bf16 where fast."""
    import torch

    ipex = import_ipex()
    model.train()  # ipex.optimize treats a model in eval mode as inference-only
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # IPEX's bf16 weight prepacking needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT and asserts
    # without it (e.g. on AVX2-only AMD EPYC): keep plain layouts there, bf16 still works.
    prepack = dtype != torch.bfloat16 or bool(ipex._C.onednn_has_bf16_support())
    if deepspeed:
        # DeepSpeed's ZeRO optimizer takes over the parameters: IPEX's copied / prepacked
        # weights and fused update step keep optimizer state under tensors ZeRO no longer
        # holds, and engine.save_checkpoint fails (KeyError in Optimizer.state_dict). In place,
        # unfused, IPEX still brings its oneDNN kernels (measured: tests/test_ipex.py).
        return ipex.optimize(
            model,
            optimizer=optimizer,
            dtype=dtype,
            weights_prepack=False,
            inplace=True,
            fuse_update_step=False,
        )
    if not prepack:
        log.warning(
            "compute.ipex with bf16 on a CPU without AVX-512 / AVX-NE-CONVERT: "
            "IPEX weight prepacking is off and bf16 runs emulated (slow)"
        )
    return ipex.optimize(model, optimizer=optimizer, dtype=dtype, weights_prepack=prepack)


def check_method(hw: Hardware, method: str) -> None:
    if method == "qlora" and hw.device_type != "cuda":
        raise RuntimeError(
            "method qlora needs compute.accelerator nvidia-gpu: its 4-bit kernels "
            "(bitsandbytes) run on CUDA only; use method lora on cpu / intel-gpu"
        )
