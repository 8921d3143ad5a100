"""A model's shape (parameter count, hidden size, layers, vocabulary) for `llmray plan`.

From the model's `config.json` when it can be read without downloading the model
(`read_config`): a local folder or file:// path, a mounted pvc://, a Hugging Face cache entry
of an hf:// model, or the one small file of an s3:// / gs:// folder. Else from the spec's
`baseModel.parameters` hint, with Llama proportions assumed for the rest (`from_parameters`).
Parameter counts follow the decoder-only transformer layout (embeddings, attention with
grouped KV heads, gated or plain MLP, norms, untied head): for Llama-2-7B's config.json
exactly 6,738,415,616, the count its checkpoint holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmray import uris

# Model types whose MLP has three matrices (gate, up, down); others have two (up, down).
GATED_MLP_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
)
# A shape assumed from a parameter count alone: Llama-2's vocabulary and proportions
# (layers = hidden / 128, MLP = 8/3 hidden, as 7B and 13B have).
ASSUMED_VOCAB = 32000
ASSUMED_LAYER_WIDTH_RATIO = 128


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden_size: int
    layers: int
    vocab_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool
    tied_embeddings: bool
    source: str  # where the numbers come from, e.g. "config.json at models/llama/config.json"

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: attention, MLP and its two norms."""
        h, kv = self.hidden_size, self.kv_heads * self.head_dim
        attention = 2 * h * self.heads * self.head_dim + 2 * h * kv
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attention + mlp + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def largest_module_parameters(self) -> int:
        """The most parameters one module holds (what one gather at a time materialises)."""
        h, i = self.hidden_size, self.intermediate_size
        return max(self.embedding_parameters, h * i, h * self.heads * self.head_dim)

    def linear(self, name: str) -> tuple[int, int] | None:
        """(in, out) features of a projection named as in Llama, e.g. q_proj; None if none."""
        h, i, q, kv = (
            self.hidden_size,
            self.intermediate_size,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        table = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "gate_proj": (h, i) if self.gated_mlp else None,
        }
        if name == "lm_head":
            return (h, self.vocab_size)
        return table.get(name)

    def linears_per_layer(self, name: str) -> int:
        return 0 if name == "lm_head" or self.linear(name) is None else self.layers


def from_config(config: dict[str, Any], source: str) -> ModelShape:
    """The shape in a Hugging Face config.json (Llama names, with GPT-style aliases)."""
    text = config.get("text_config")  # multimodal configs nest the language model's
    if isinstance(text, dict):
        config = {**config, **text}

    def get(*names: str, default: Any = None) -> Any:
        return next((config[n] for n in names if config.get(n) is not None), default)

    h = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head", "num_heads"))
    shape = ModelShape(
        parameters=0,
        hidden_size=h,
        layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
        vocab_size=int(get("vocab_size")),
        intermediate_size=int(get("intermediate_size", "n_inner", default=4 * h) or 4 * h),
        heads=heads,
        kv_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(get("head_dim", default=h // heads) or h // heads),
        gated_mlp=str(config.get("model_type", "")) in GATED_MLP_TYPES,
        tied_embeddings=bool(get("tie_word_embeddings", default=False)),
        source=source,
    )
    head = 0 if shape.tied_embeddings else shape.embedding_parameters
    total = shape.embedding_parameters + shape.layers * shape.layer_parameters + h + head
    return replace(shape, parameters=total)


def from_parameters(parameters: int, source: str) -> ModelShape:
    """A Llama-shaped model of about `parameters` (only a count is known): 12*h^2 per layer
    and h/128 layers give h = cbrt(parameters * 128 / 12), rounded to a multiple of 128."""
    h = max(128, round((parameters * ASSUMED_LAYER_WIDTH_RATIO / 12) ** (1 / 3) / 128) * 128)
    layers = max(1, round((parameters - 2 * ASSUMED_VOCAB * h) / (12 * h * h)))
    intermediate = math.ceil(8 * h / 3 / 256) * 256
    heads = max(1, h // 128)
    return ModelShape(
        parameters=parameters,
        hidden_size=h,
        layers=layers,
        vocab_size=ASSUMED_VOCAB,
        intermediate_size=intermediate,
        heads=heads,
        kv_heads=heads,
        head_dim=h // heads,
        gated_mlp=True,
        tied_embeddings=False,
        source=source,
    )


def read_config(
    uri: str, base_dir: Path, cache_dir: Path, revision: str | None = None
) -> tuple[dict[str, Any], str] | None:
    """(config.json, where it was read) of the model at `uri`, without downloading the model;
    None when it cannot be read from here (nothing cached, no credentials, a .gguf file)."""
    try:
        u = uris.parse(uri)
        if u.scheme in ("file", "pvc"):
            path = uris.local_path(uri, base_dir)
            found = path / "config.json" if path is not None else None
            return _read_json(found) if found is not None and found.is_file() else None
        if u.scheme == "hf":
            return _read_hub_cache(u, cache_dir, revision)
        fs = uris._filesystem(u.scheme, "")
        remote = f"{u.authority}/{u.path}".rstrip("/") + "/config.json"
        return json.loads(fs.cat(remote)), f"{u.scheme}://{remote}"
    except Exception:  # unreachable, no driver, no credentials: the plan falls back to the hint
        return None


def _read_json(path: Path) -> tuple[dict[str, Any], str]:
    return json.loads(path.read_text()), str(path)


def _read_hub_cache(
    u: uris.Uri, cache_dir: Path, revision: str | None
) -> tuple[dict[str, Any], str] | None:
    from huggingface_hub import try_to_load_from_cache

    repo_id = f"{u.authority}/{u.path.split('/', 1)[0]}"
    for cache in (str(cache_dir), None):  # llmray's download cache, then the user's HF cache
        found = try_to_load_from_cache(
            repo_id, "config.json", cache_dir=cache, revision=revision or "main"
        )
        if isinstance(found, str):
            return _read_json(Path(found))
    return None


def resolve_shape(
    uri: str,
    parameters_hint: int | None,
    base_dir: Path,
    cache_dir: Path,
    revision: str | None = None,
) -> ModelShape | None:
    """The model's shape: config.json when readable, else the hint, else None (unknown)."""
    found = read_config(uri, base_dir, cache_dir, revision)
    if found is not None:
        config, where = found
        try:
            return from_config(config, f"config.json at {where}")
        except (TypeError, ValueError, KeyError, ZeroDivisionError):
            pass  # not a decoder-only transformer config we can read: use the hint
    if parameters_hint:
        return from_parameters(
            parameters_hint,
            "spec.baseModel.parameters (config.json not readable here; Llama proportions "
            "assumed for the shape)",
        )
    return None
