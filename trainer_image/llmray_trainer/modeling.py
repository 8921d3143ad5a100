"""Base model and tokenizer: fetch, convert GGUF, add tokens, LoRA, gradient checkpointing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmray.trainer_config import TrainerConfig

log = logging.getLogger(__name__)


def resolve_base_model(cfg: TrainerConfig) -> Path:
    """A local Hugging Face folder for `spec.baseModel.uri` (downloaded / converted once)."""
    from llmray import uris
    from llmray_trainer.gguf import cached_gguf_conversion

    source = cfg.spec.baseModel
    path = uris.fetch(
        source.uri,
        Path(cfg.base_dir),
        Path(cfg.cache_dir),
        revision=source.revision,
        field="spec.baseModel.uri",
    )
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_conversion(path, Path(cfg.cache_dir) / "gguf")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cached_gguf_conversion(ggufs[0], Path(cfg.cache_dir) / "gguf")
        raise FileNotFoundError(
            f"spec.baseModel.uri {source.uri}: {path} holds no config.json (not a Hugging Face "
            "model folder) and not exactly one .gguf file"
        )
    return path


def load_tokenizer(model_dir: Path, fmt: str, special_tokens: list[str]) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    from llmray_trainer.data import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    added = prepare_tokenizer(tokenizer, fmt, list(special_tokens))
    return tokenizer, added


def build_model(
    cfg: TrainerConfig, model_dir: Path, tokenizer: Any, added_tokens: int, *, full_precision=False
) -> Any:
    """The model to train, on CPU in fp32 (autocast / DeepSpeed handle lower precision).

    `full_precision`: never 4-bit, even for qlora (the export merges adapters into fp32 weights).
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = cfg.spec
    if spec.method == "qlora" and not full_precision:
        model = _load_4bit(model_dir, spec.hyperparameters.precision)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.hyperparameters.gradientCheckpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.method in ("lora", "qlora"):
        model = apply_lora(model, cfg, train_embeddings=added_tokens > 0)
    return model


def _load_4bit(model_dir: Path, precision: str) -> Any:
    """QLoRA: frozen base weights in 4-bit NF4 on this worker's GPU, adapters in full precision.

    Not run in CI (no GPU there); `hardware.check_method` keeps it off CPUs.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "method qlora needs bitsandbytes in the trainer image: pip install 'llmray[gpu]'"
        ) from exc
    from peft import prepare_model_for_kbit_training

    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=compute,
        device_map={"": torch.cuda.current_device()},
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def apply_lora(model: Any, cfg: TrainerConfig, *, train_embeddings: bool) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = cfg.spec.lora
    if lora is None:  # defaults of the Lora model
        from llmray.api.finetunejob import Lora

        lora = Lora()
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targetModules),
        task_type="CAUSAL_LM",
        # New special tokens start as random rows: they must be trained, not frozen.
        modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None,
    )
    if cfg.spec.hyperparameters.gradientCheckpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, config)
    return model


def trainable_state_dict(model: Any) -> dict[str, Any]:
    """Only what training changes: small checkpoints for LoRA, everything for full."""
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state_dict(model: Any, state: dict[str, Any]) -> None:
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable & set(result.missing_keys)
    if result.unexpected_keys or missing:
        raise RuntimeError(
            "checkpoint does not match the model (was the spec changed under the same job "
            f"name?): unexpected {result.unexpected_keys[:5]}, missing {sorted(missing)[:5]}"
        )
