"""Tiny LoRA adapters for serving tests, made with peft directly on the tiny model: random
low-rank updates large enough that each adapter's greedy answers differ from the base's and
from each other's, saved both as an adapter (PEFT format) and merged into a whole model."""

from __future__ import annotations

import shutil
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, rank: int = 4) -> tuple[Path, Path]:
    """(adapter folder, merged model folder) under `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B at zero (no change): give both A and B weight
                param.normal_(0.0, 0.3)
    adapter, merged = out / "adapter", out / "merged"
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    for f in base.iterdir():  # the tokenizer beside the merged model
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, merged / f.name)
    return adapter, merged
