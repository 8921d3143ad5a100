"""LoRA adapters in the transformers engine: many adapters, one base model, one batch.

peft's mixed-adapter batches (`adapter_names=[...]`, one name per row, "__base__" for the
base model) run each LoRA layer as the base layer's output plus, for the rows of each
adapter, that adapter's low-rank update. transformers' continuous batching packs every
request of a step into one row of tokens (input_ids of shape [1, tokens]), so here the
"rows" are tokens: each LoRA layer's input is seen as [tokens, features], with one adapter
name per token, taken from the request each token belongs to:

    step:     request 7 (adapter a1, prefill 5 tokens) | request 9 (base, decode 1 token)
    names:    a1 a1 a1 a1 a1 __base__

Adapters are loaded into the model with peft (`PeftModel.from_pretrained`, then
`load_adapter` / `delete_adapter`) on the generation thread between two steps, so no
forward pass sees a layer change under it; the registry never unloads an adapter while a
request of it is in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class MixedLoRA:
    def __init__(self, model: Any) -> None:
        self.model = model  # the base model: peft injects LoRA layers into it in place
        self.peft: Any = None  # the PeftModel, from the first adapter on
        self.adapter_of: dict[str, str] = {}  # transformers request id -> adapter key
        self._local = threading.local()  # this thread's forward: per-token names and shape
        self._hooked: set[int] = set()  # ids of the LoRA layers carrying our hooks

    # --- on the generation thread, between steps ---

    def load(self, key: str, path: str) -> None:
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(path)
        refuse = _unsupported(config)
        if refuse:
            raise ValueError(f"adapter {path}: {refuse}")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=key)
        else:
            self.peft.load_adapter(path, adapter_name=key)
        self.peft.eval()
        other = self._not_linear(key)
        if other:
            self.unload(key)
            raise ValueError(
                f"adapter {path}: LoRA on {other} (not a linear layer) cannot be mixed in a batch"
            )
        self._hook_layers()

    def unload(self, key: str) -> None:
        if self.peft is not None and key in self.peft.peft_config:
            self.peft.delete_adapter(key)

    def hook_batches(self, processor: Any) -> None:
        """Per-token adapter names for each step transformers prepares (once per processor)."""
        io = processor.inputs_and_outputs
        if getattr(io, "_llmray_lora", False):
            return
        prepare = io.prepare_batch_tensors  # a transformers upgrade that renames it fails here

        def prepare_batch_tensors(requests_in_batch: list[Any], *args: Any, **kwargs: Any) -> Any:
            names: list[str] = []
            for future in requests_in_batch:
                key = self.adapter_of.get(future.state.request_id, BASE)
                names.extend([key] * future.query_length)
            self._local.names = names
            return prepare(requests_in_batch, *args, **kwargs)

        io.prepare_batch_tensors = prepare_batch_tensors
        io._llmray_lora = True

    # --- a plain forward pass outside the batch (the prompt's logprobs) ---

    @contextmanager
    def plain(self, key: str | None, tokens: int) -> Iterator[None]:
        self._local.names = [key or BASE] * tokens
        try:
            yield
        finally:
            self._local.names = None

    # --- internals ---

    def _hook_layers(self) -> None:
        from peft.tuners.lora import Linear

        for module in self.model.modules():
            if isinstance(module, Linear) and id(module) not in self._hooked:
                module.register_forward_pre_hook(self._before, with_kwargs=True)
                module.register_forward_hook(self._after)
                self._hooked.add(id(module))

    def _not_linear(self, key: str) -> str | None:
        from peft.tuners.lora import Linear, LoraLayer

        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer) or isinstance(module, Linear):
                continue
            if key in module.lora_A or key in getattr(module, "lora_embedding_A", {}):
                return name
        return None

    def _before(self, _: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, rest = args[0], args[1:]
        tokens = x.numel() // x.shape[-1]
        names = getattr(self._local, "names", None) or []
        if len(names) != tokens:  # padding, or a forward pass nobody named: the base model
            names = (names + [BASE] * tokens)[:tokens]
        self._local.shape = x.shape
        return (x.reshape(tokens, x.shape[-1]), *rest), {**kwargs, "adapter_names": names}

    def _after(self, _: Any, __: Any, output: Any) -> Any:
        return output.reshape(*self._local.shape[:-1], output.shape[-1])


def _unsupported(config: Any) -> str | None:
    """What this engine cannot mix in a batch, in words; None when it can serve it."""
    if config.peft_type != "LORA":  # peft's PeftType is a str enum
        return f"peft_type {config.peft_type}: only LoRA adapters are served"
    if getattr(config, "modules_to_save", None):
        return (
            f"modules_to_save {config.modules_to_save}: an adapter that carries whole modules "
            "(e.g. embeddings for new tokens) cannot share the base model; merge it instead "
            "(output.mergeLora: true)"
        )
    if getattr(config, "use_dora", False):
        return "use_dora: DoRA adapters are not served; merge it instead"
    return None
