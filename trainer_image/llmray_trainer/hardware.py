"""Hardware specifics of training: worker threads, precision, IPEX, qlora's device.

The accelerator table itself (torch device, process-group backend, DeepSpeed's accelerator,
oneCCL settings) is `llmray.hardware`, shared with the operator and the server. Chosen from
the spec (`compute.accelerator`, `compute.ipex`, `hyperparameters.precision`),
never from optional imports swallowed by a bare `except`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from llmray.hardware import Profile

log = logging.getLogger(__name__)

IPEX_HELP = (
    "compute.ipex: true needs Intel Extension for PyTorch, whose last release (2.8) requires "
    "torch 2.8.*: install it in its own environment with `pip install 'llmray[train,ipex]'` "
    "(see docs/ipex.md) or use the Intel trainer image"
)


MMAP_THRESHOLD_BYTES = 1 << 20  # allocations above it are mmapped, returned to the OS on free


def worker_env(hw: Profile, strategy: str, threads: int, *, zero3: bool = False) -> dict[str, str]:
    """Environment for every worker process, set before torch / deepspeed import.

    Oversubscribed threads made one measured run 11x slower: pin OMP to the worker's cores.
    """
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if zero3:
        # glibc's malloc raises its mmap threshold after each large free (up to 32 MiB), so
        # the buffers ZeRO-3 gathers and frees module by module land in the heap and stay
        # there: measured, a ZeRO-3 rank kept 250 MB after loading a 194 MB model whose
        # shard is 97 MB, 117 MB with a fixed 1 MiB threshold (tests/test_finetune.py).
        # ZeRO-3 only: every activation over 1 MiB is then mmapped afresh each step and its
        # pages faulted in and zeroed again. Measured: a plain loop 12% slower (4.7x the page
        # faults); DDP, 2 workers on 2 cores, 592 tokens/s with it, 848 without
        # (BENCHMARKS.md, "Training throughput").
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    if strategy == "deepspeed":
        env["DS_ACCELERATOR"] = hw.ds_accelerator
    env.update(hw.ccl_env)
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


def check_precision(hw: Profile, precision: str) -> None:
    if precision == "bf16" and hw.device_type == "cpu" and not cpu_has_bf16():
        log.warning(
            "hyperparameters.precision bf16 on a CPU without bf16 hardware (no AMX / "
            "AVX-512 BF16): measured ~10x slower than fp32 on such CPUs; consider fp32"
        )


def autocast(hw: Profile, precision: str) -> contextlib.AbstractContextManager[Any]:
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


def check_method(hw: Profile, method: str) -> None:
    if method == "qlora" and hw.device_type != "cuda":
        raise RuntimeError(
            "method qlora needs compute.accelerator nvidia-gpu: its 4-bit kernels "
            "(bitsandbytes) run on CUDA only; use method lora on cpu / intel-gpu"
        )
