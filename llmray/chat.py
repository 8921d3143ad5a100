"""The chat rendering shared by the trainer (`chat` / `instruction` data) and the server.

A model is trained and served through one path: messages rendered by the tokenizer's own chat
template, or, when the tokenizer has none (e.g. the tiny test model, a base model), by
`DEFAULT_CHAT_TEMPLATE` below (ChatML, as SmolLM2 and Qwen use), which the trainer also stores
into the exported tokenizer so the server renders prompts exactly as training saw them.

Rendered example::

    <|im_start|>user
    What is 2+2?<|im_end|>
    <|im_start|>assistant
    4<|im_end|>
"""

from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokens the default template relies on; added as special tokens when it is applied.
DEFAULT_CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
ROLES = ("system", "user", "assistant")


def instruction_to_messages(
    instruction: str, context: str = "", response: str | None = None
) -> list[dict[str, str]]:
    """An `instruction` record as chat messages: the context follows the instruction."""
    user = instruction if not context else f"{instruction}\n\n{context}"
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages
