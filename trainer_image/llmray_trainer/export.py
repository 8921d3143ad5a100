"""The final model at `output.uri`, streamed: one module gathered at a time, sharded files.

    model-00001-of-00003.safetensors ... model.safetensors.index.json, config.json, tokenizer
    (lora / qlora with mergeLora false: adapter_model.safetensors, adapter_config.json whose
    base_model_name_or_path is the job's baseModel.uri, and the tokenizer if training changed it)

Under ZeRO-3 every weight lives in pieces on all ranks: all ranks gather one module's
parameters together (`deepspeed.zero.GatheredParameters`, public API), rank 0 copies them into
the shard it is filling and writes the shard once it holds `EXPORT_SHARD_BYTES`. So rank 0's
extra memory is one shard plus one module, never the model, and no second model is built.
Under DDP / ZeRO-1/2 every rank holds whole weights: rank 0 walks them alone. LoRA adapters
are merged module by module (W + B @ A * scale), on the gathered weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmray import uris
from llmray.sizing import EXPORT_SHARD_BYTES
from llmray.trainer_config import TrainerConfig, adapter_output, base_model_uri
from llmray_trainer.checkpoint import unwrap

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def export_model(
    cfg: TrainerConfig,
    model: Any,
    engine: Any | None,
    tokenizer: Any,
    base_dir: Path,
    added_tokens: int,
    rank: int,
) -> None:
    """Every rank calls it (ZeRO-3's gathers are collectives); rank 0 writes and uploads."""
    import torch.distributed as dist

    module = unwrap(model)
    zero3 = engine is not None and engine.zero_optimization_stage() == 3
    spec = cfg.spec
    adapter_only = hasattr(module, "peft_config") and adapter_output(spec)
    tmp = Path(tempfile.mkdtemp(prefix="llmray-export-")) if rank == 0 else None
    try:
        if adapter_only:
            adapter = gather_trainable(module, zero3, rank)
            if tmp is not None:
                save_adapter(module, adapter, tmp, base_model_uri(cfg))
        elif spec.method == "qlora":
            # The trained base is 4-bit: rank 0 merges the adapters into an fp32 copy of it.
            if tmp is not None:
                from llmray_trainer.modeling import trainable_state_dict

                full = _rebuild_cpu_model(
                    cfg, base_dir, tokenizer, added_tokens, trainable_state_dict(module)
                )
                write_model(full, tokenizer, tmp, zero3=False, rank=0, dtype=torch.float32)
        else:
            dtype = next(module.parameters()).dtype
            write_model(module, tokenizer, tmp, zero3=zero3, rank=rank, dtype=dtype)
        if tmp is not None:
            # An adapter is served with its base model's tokenizer: it carries one only when
            # training changed it (added tokens, a chat template), as PEFT does.
            if not adapter_only or tokenizer_changed(tokenizer, base_dir):
                tokenizer.save_pretrained(tmp)
            uris.upload(tmp, cfg.output_uri, Path(cfg.base_dir))
            log.info("exported %s to %s", "adapter" if adapter_only else "model", cfg.output_uri)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears down the group while rank 0 still writes


def tokenizer_changed(tokenizer: Any, base_dir: Path) -> bool:
    """Whether `tokenizer` differs from the base model's own (in `base_dir`) in what a server
    depends on: the vocabulary, the special tokens or the chat template."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_dir)
    return (
        base.get_vocab() != tokenizer.get_vocab()
        or base.chat_template != tokenizer.chat_template
        or (base.eos_token, base.pad_token, base.bos_token)
        != (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token)
    )


def write_model(
    module: Any,
    tokenizer: Any,
    out: Path | None,
    *,
    zero3: bool,
    rank: int,
    dtype: torch.dtype,
    shard_bytes: int = EXPORT_SHARD_BYTES,
) -> None:
    """Weights as sharded safetensors plus config.json / generation_config.json (rank 0)."""
    base = module.get_base_model() if hasattr(module, "peft_config") else module
    writer = ShardWriter(out, shard_bytes) if rank == 0 and out is not None else None
    for name, tensor in stream_weights(base, zero3=zero3, rank=rank, dtype=dtype):
        if writer is not None:
            writer.add(name, tensor)
    if writer is None or out is None:
        return
    names = writer.close()
    config = copy.deepcopy(base.config)
    config.use_cache = True
    config.dtype = dtype
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in names:
        config.tie_word_embeddings = False  # a trained head of its own (modules_to_save)
    # prepare_tokenizer may have made the end-of-turn marker the eos (llmray's default chat
    # template): generation must stop there, in `generate` and in the server alike.
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.save_pretrained(out)
    generation = copy.deepcopy(getattr(base, "generation_config", None))
    if generation is not None:
        generation.eos_token_id = tokenizer.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(out)


def stream_weights(
    base: Any, *, zero3: bool, rank: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, CPU tensor) of every weight, one module gathered at a time; rank 0
    gets the tensors, the other ranks only take part in the gathers (nothing is yielded)."""
    seen: set[int] = set()  # tied weights (embeddings / head) are written once
    for prefix, mod, kind in export_units(base):
        params = list(mod.parameters() if kind != "plain" else mod.parameters(recurse=False))
        with _gathered(params, zero3):
            if rank != 0:
                continue
            for name, tensor in _unit_tensors(prefix, mod, kind):
                if isinstance(tensor, torch.nn.Parameter):  # lives as long as the model
                    if id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                yield name, tensor.detach().to("cpu", dtype).clone()


def export_units(root: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(name prefix, module, kind) in order: a LoRA layer or a modules_to_save wrapper whole
    ("lora", "saved"), every other module with its own parameters and buffers ("plain")."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(root, LoraLayer):
        yield prefix, root, "lora"
        return
    if isinstance(root, ModulesToSaveWrapper):
        yield prefix, root, "saved"
        return
    if any(True for _ in root.parameters(recurse=False)) or _persistent_buffers(root):
        yield prefix, root, "plain"
    for name, child in root.named_children():
        yield from export_units(child, f"{prefix}{name}.")


def _unit_tensors(prefix: str, mod: Any, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    if kind == "plain":
        for name, p in mod.named_parameters(recurse=False):
            yield prefix + name, p
        for name, b in _persistent_buffers(mod):
            yield prefix + name, b
    elif kind == "saved":
        trained = mod.modules_to_save[mod.active_adapters[0]]
        for name, p in trained.named_parameters():
            yield prefix + name, p
    else:  # a LoRA layer: its base weight plus every active adapter's B @ A * scale
        base = mod.get_base_layer()
        weight = base.weight.detach().float()
        for adapter in mod.active_adapters:
            if adapter in mod.lora_A or adapter in getattr(mod, "lora_embedding_A", {}):
                weight = weight + mod.get_delta_weight(adapter).float()
        yield prefix + "weight", weight
        if getattr(base, "bias", None) is not None:
            yield prefix + "bias", base.bias


def _persistent_buffers(mod: Any) -> list[tuple[str, torch.Tensor]]:
    skip = getattr(mod, "_non_persistent_buffers_set", set())
    return [(n, b) for n, b in mod.named_buffers(recurse=False) if n not in skip and b is not None]


def _gathered(params: list[Any], zero3: bool) -> contextlib.AbstractContextManager[Any]:
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class ShardWriter:
    """Fills safetensors shards up to `max_bytes` and writes each when full; `close` names them
    as Hugging Face does (model-00001-of-00003.safetensors + index, or model.safetensors)."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        out.mkdir(parents=True, exist_ok=True)
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self._flush()
        self.shard[name] = tensor.contiguous()
        self.shard_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f"shard-{len(self.files):05d}.tmp"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> list[str]:
        if self.shard or not self.files:
            self._flush()
        names = [n for _, keys in self.files for n in keys]
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / WEIGHTS_NAME)
            return names
        weight_map = {}
        count = len(self.files)
        for i, (path, keys) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names


def gather_trainable(module: Any, zero3: bool, rank: int) -> dict[str, torch.Tensor]:
    """The trained parameters (the adapter), whole, on rank 0 (empty elsewhere)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        with _gathered([p], zero3):
            if rank == 0:
                out[name] = p.detach().to("cpu").clone()
    return out


def save_adapter(module: Any, state: dict[str, torch.Tensor], out: Path, base_uri: str) -> None:
    """The adapter alone, in PEFT's layout (what `PeftModel.from_pretrained` and vLLM read)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(module, state_dict=state, save_embedding_layers=False)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(out / ADAPTER_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(module.peft_config[module.active_adapter])
    config.base_model_name_or_path = base_uri
    config.inference_mode = True
    config.save_pretrained(str(out))


def _rebuild_cpu_model(
    cfg: TrainerConfig, base_dir: Path, tokenizer: Any, added: int, state_dict: dict[str, Any]
) -> Any:
    from llmray_trainer.modeling import build_model

    module = build_model(cfg, base_dir, tokenizer, added, dtype=torch.float32, full_precision=True)
    result = module.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"trained weights do not fit the model: {result.unexpected_keys[:5]}")
    return module
