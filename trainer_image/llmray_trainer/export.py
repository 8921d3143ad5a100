"""The final model in Hugging Face format (weights + config + tokenizer) at `output.uri`.

ZeRO-3 shards every weight: all ranks take part in gathering them, rank 0 writes. That gather
is why rank 0 needs host memory for the whole model (see docs/sizing.md).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmray import uris
from llmray.trainer_config import TrainerConfig
from llmray_trainer.checkpoint import unwrap
from llmray_trainer.modeling import trainable_state_dict

log = logging.getLogger(__name__)


def export_model(
    cfg: TrainerConfig,
    model: Any,
    engine: Any | None,
    tokenizer: Any,
    base_dir: Path,
    added_tokens: int,
    rank: int,
) -> None:
    import torch.distributed as dist

    module = unwrap(model)
    state_dict = None
    if engine is not None and engine.zero_optimization_stage() == 3:
        # Collective: every rank must call it; only rank 0 gets the full state dict.
        state_dict = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            module = _rebuild_cpu_model(cfg, base_dir, tokenizer, added_tokens, state_dict)
    elif cfg.spec.method == "qlora" and rank == 0:
        # The trained base is 4-bit: put the adapters on an fp32 copy of it to merge and save.
        adapters = trainable_state_dict(module)
        module = _rebuild_cpu_model(cfg, base_dir, tokenizer, added_tokens, adapters)
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(prefix="llmray-export-"))
        try:
            save_hf(module, tokenizer, tmp, merge=cfg.spec.output.mergeLora)
            uris.upload(tmp, cfg.output_uri, Path(cfg.base_dir))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("exported model to %s", cfg.output_uri)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears down the group while rank 0 still writes


def save_hf(module: Any, tokenizer: Any, out: Path, *, merge: bool) -> None:
    import torch

    is_peft = hasattr(module, "peft_config")
    if is_peft and merge:
        module = module.merge_and_unload()
    module = module.to(torch.float32)
    module.config.use_cache = True
    # prepare_tokenizer may have made the end-of-turn marker the eos (llmray's default chat
    # template): generation must stop there, in `generate` and in the server alike.
    module.config.eos_token_id = tokenizer.eos_token_id
    module.config.pad_token_id = tokenizer.pad_token_id
    if module.generation_config is not None:
        module.generation_config.eos_token_id = tokenizer.eos_token_id
        module.generation_config.pad_token_id = tokenizer.pad_token_id
    module.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _rebuild_cpu_model(
    cfg: TrainerConfig, base_dir: Path, tokenizer: Any, added: int, state_dict: dict[str, Any]
) -> Any:
    from llmray_trainer.modeling import build_model

    module = build_model(cfg, base_dir, tokenizer, added, full_precision=True)
    result = module.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(
            f"gathered ZeRO-3 weights do not fit the model: {result.unexpected_keys[:5]}"
        )
    return module
