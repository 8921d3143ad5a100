"""Base model and tokenizer: fetch, convert GGUF, add tokens, LoRA, gradient checkpointing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmray.trainer_config import TrainerConfig

log = logging.getLogger(__name__)


def resolve_base_model(cfg: TrainerConfig) -> Path:
    """A local Hugging Face folder for `spec.baseModel.uri` (downloaded / converted once)."""
    from llmray import uris
    from llmray.paths import pod_path
    from llmray_trainer.gguf import cached_gguf_conversion

    source = cfg.spec.baseModel
    cache = pod_path(cfg.cache_dir)
    path = uris.fetch(
        source.uri,
        Path(cfg.base_dir),
        cache,
        revision=source.revision,
        field="spec.baseModel.uri",
    )
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_conversion(path, cache / "gguf")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cached_gguf_conversion(ggufs[0], cache / "gguf")
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
    cfg: TrainerConfig,
    model_dir: Path,
    tokenizer: Any,
    added_tokens: int,
    *,
    dtype: Any,
    full_precision: bool = False,
) -> Any:
    """The model to train, built once in `dtype` (`weights_dtype`).

    Under ZeRO-3 the caller has called `register_zero3` first: transformers then builds the
    model inside DeepSpeed's zero.Init and loads the checkpoint straight into the partitions
    (rank 0 reads it, the others only receive their shard), so no rank ever holds it whole.
    `full_precision`: never 4-bit, even for qlora (the export merges adapters into it).
    """
    from transformers import AutoModelForCausalLM

    spec = cfg.spec
    if spec.method == "qlora" and not full_precision:
        model = _load_4bit(model_dir, spec.hyperparameters.precision)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
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


def weights_dtype(cfg: TrainerConfig) -> Any:
    """torch dtype of `llmray.sizing.weights_precision`: 16-bit under DeepSpeed when the
    precision says so, else fp32 (DDP's autocast keeps fp32 weights)."""
    import torch

    from llmray.sizing import weights_precision

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return names[weights_precision(cfg.spec)]


def hidden_size(model_dir: Path) -> int:
    from llmray.model_shape import from_config

    config = json.loads((model_dir / "config.json").read_text())
    return from_config(config, str(model_dir)).hidden_size


def register_zero3(ds_config: dict[str, Any], dist_backend: str) -> Any:
    """Registers a ZeRO-3 DeepSpeed config with transformers, so that `from_pretrained` builds
    the model inside DeepSpeed's zero.Init (public API: `transformers.integrations.
    HfDeepSpeedConfig`). transformers keeps only a weak reference: the caller keeps the
    returned object referenced for as long as the model lives."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # DeepSpeed reads the world size from its own communication layer, which wraps the
    # process group Ray Train made (else it checks train_batch_size against 1 worker).
    deepspeed.init_distributed(dist_backend=dist_backend)
    return HfDeepSpeedConfig(ds_config)


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
