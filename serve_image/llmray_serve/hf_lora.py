"""LoRA adapters in the transformers engine: many adapters, one base model, one batch.

As peft's mixed-adapter batches (`adapter_names=[...]`, one name per row, "__base__" for the
base model), each LoRA layer is its base layer's output plus, for the rows of each adapter,
that adapter's low-rank update. transformers' continuous batching packs every request of a
step into one row of tokens (input_ids of shape [1, tokens]), so here the rows are tokens,
each with the adapter of the request it belongs to:

    step:     request 7 (adapter a1, prefill 5 tokens) | request 9 (base, decode 1 token)
    names:    a1 a1 a1 a1 a1 __base__          -> groups: a1: tokens [0..4]

The groups are made once per step; each LoRA layer then runs as its base layer only (peft's
adapters disabled there) and a hook adds, per group, `B(A(x[tokens])) * scaling` into those
tokens' outputs (index_select / index_add). peft's own `_mixed_batch_forward` finds each
adapter's rows with a Python loop over every row in every layer: with a small model that
loop was most of the step (0.27x of a merged model's throughput with 4 adapters, BENCHMARKS.md).

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

import torch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class MixedLoRA:
    def __init__(self, model: Any) -> None:
        self.model = model  # the base model: peft injects LoRA layers into it in place
        self.peft: Any = None  # the PeftModel, from the first adapter on
        self.adapter_of: dict[str, str] = {}  # transformers request id -> adapter key
        self._local = threading.local()  # this thread's forward: the tokens of each adapter
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
            tokens: dict[str, list[int]] = {}
            at = 0
            for future in requests_in_batch:
                key = self.adapter_of.get(future.state.request_id, BASE)
                if key != BASE:
                    tokens.setdefault(key, []).extend(range(at, at + future.query_length))
                at += future.query_length
            self._local.groups = self._groups(tokens)
            return prepare(requests_in_batch, *args, **kwargs)

        io.prepare_batch_tensors = prepare_batch_tensors
        io._llmray_lora = True

    # --- a plain forward pass outside the batch (the prompt's logprobs) ---

    @contextmanager
    def plain(self, key: str | None, tokens: int) -> Iterator[None]:
        self._local.groups = self._groups({key: list(range(tokens))} if key else {})
        try:
            yield
        finally:
            self._local.groups = None

    # --- internals ---

    def _groups(self, tokens: dict[str, list[int]]) -> list[tuple[str, torch.Tensor]]:
        device = self.model.device
        return [(k, torch.tensor(ix, dtype=torch.long, device=device)) for k, ix in tokens.items()]

    def _hook_layers(self) -> None:
        from peft.tuners.lora import Linear

        for module in self.model.modules():
            if not isinstance(module, Linear):
                continue
            module._disable_adapters = True  # the base layer only: _add_updates adds the rest
            if id(module) not in self._hooked:
                module.register_forward_hook(self._add_updates)
                self._hooked.add(id(module))

    def _not_linear(self, key: str) -> str | None:
        """A layer this adapter changes that is not a plain LoRA linear layer (an embedding,
        a convolution, a LoRA variant such as aLoRA), or None."""
        from peft.tuners.lora import Linear, LoraLayer

        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            touched = key in module.lora_A or key in getattr(module, "lora_embedding_A", {})
            if touched and (not isinstance(module, Linear) or key in module.lora_variant):
                return name
        return None

    def _add_updates(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Each group's low-rank update into its tokens' outputs (in place)."""
        groups = getattr(self._local, "groups", None)
        if not groups:
            return output
        x = args[0].reshape(-1, args[0].shape[-1])
        out = output.view(-1, output.shape[-1])
        for key, tokens in groups:
            if key not in module.lora_A:  # this adapter does not touch this layer
                continue
            a, b = module.lora_A[key], module.lora_B[key]
            update = b(a(x.index_select(0, tokens).to(a.weight.dtype))) * module.scaling[key]
            out.index_add_(0, tokens, update.to(out.dtype))
        return output


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
