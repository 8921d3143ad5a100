"""The model's tokenizer, as both engines use it: token counts and chat prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmray.chat import DEFAULT_CHAT_TEMPLATE


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's tokenizer; without a chat template of its own, the trainer's default (the
    format `chat` data was fine-tuned in), so chat prompts match training."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TokenizerPrompts:
    """`count_tokens` and `render_chat` of the Engine interface, from `self.tokenizer`."""

    tokenizer: Any

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
