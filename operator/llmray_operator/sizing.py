"""Rank-0 memory: to consolidate a ZeRO-3 checkpoint, rank 0 holds the full model in host RAM
several times over (gathered fp32/bf16 weights, the state dict being written, the copy being
serialized). Rule of thumb used here and in the docs: about 4x the model's bytes."""

from __future__ import annotations

import math
import re

from llmray.api.finetunejob import FineTuneJob

CONSOLIDATION_FACTOR = 4
BYTES_PER_PARAM = {"bf16": 2, "fp16": 2, "fp32": 4}
# "Llama-2-7b-hf" -> 7e9, "gpt-j-6b" -> 6e9, "SmolLM2-135M" -> 135e6, "Qwen2.5-0.5B" -> 0.5e9
_SIZE_RE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


def parameters_from_name(uri: str) -> float | None:
    """Parameter count written in a model's name (the last path part), if any."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    found = _SIZE_RE.findall(name)
    if not found:
        return None
    number, unit = found[-1]
    return float(number) * (1e9 if unit.lower() == "b" else 1e6)


def rank0_memory(job: FineTuneJob) -> str | None:
    """rank0.memory when set; else 4x the model's bytes (from its name) rounded up to Gi, never
    below a worker's memory; None when neither is known."""
    compute = job.spec.compute
    if compute.rank0 is not None and compute.rank0.memory is not None:
        return str(compute.rank0.memory)
    params = parameters_from_name(job.spec.baseModel.uri)
    worker = compute.resourcesPerWorker.memory
    if params is None:
        return None if worker is None else str(worker)
    precision = job.spec.hyperparameters.precision
    gib = math.ceil(params * BYTES_PER_PARAM[precision] * CONSOLIDATION_FACTOR / 2**30)
    if worker is not None and _gib(worker) is not None and _gib(worker) >= gib:
        return str(worker)
    return f"{gib}Gi"


def _gib(quantity: int | str) -> float | None:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    text = str(quantity)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor / 2**30
    try:
        return float(text) / 2**30
    except ValueError:
        return None
