"""The model's tokenizer, as both engines use it: token counts, chat prompts, token texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmray.chat import DEFAULT_CHAT_TEMPLATE, template_for_tools, template_messages
from llmray_serve.engine import InvalidParameter, InvalidPrompt, SamplingParams


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
    """`count_tokens`, `render_chat` and `tool_format` of the Engine interface, and the
    prompt's token ids the engines generate from, from `self.tokenizer`."""

    tokenizer: Any

    @property
    def tool_format(self) -> str:
        return template_for_tools(self.tokenizer.get_chat_template(tools=[]))[1]

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt as token ids. An empty prompt starts a new document, as OpenAI documents
        for /v1/completions: from the beginning-of-text token (a model cannot generate from no
        token at all: transformers' forward pass fails on it, vLLM refuses it)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            return ids
        if self.tokenizer.bos_token_id is None:
            raise InvalidPrompt(
                "the prompt is empty (it has no tokens) and this model has no "
                "beginning-of-text token to start from: send some text"
            )
        return [self.tokenizer.bos_token_id]

    def count_tokens(self, text: str) -> int:
        return len(self.prompt_ids(text))

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        uses_tools = bool(tools) or any(
            m.get("tool_calls") or m["role"] == "tool" for m in messages
        )
        template = None
        if uses_tools:
            template = template_for_tools(self.tokenizer.get_chat_template(tools=tools or []))[0]
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                template_messages(messages),
                tools=tools or None,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except TemplateError as exc:  # the template's own raise_exception (e.g. role order)
            raise InvalidPrompt(f"the model's chat template refused these messages: {exc}") from exc

    def token_text(self, token_id: int) -> str:
        """A token as text (logprobs): decoded alone, special tokens as written."""
        return self.tokenizer.decode([token_id])

    def check_logit_bias(self, params: SamplingParams) -> None:
        vocabulary = len(self.tokenizer)
        for token, _ in params.logit_bias:
            if token >= vocabulary:
                raise InvalidParameter(
                    "logit_bias",
                    f"logit_bias: token {token} is not in this model's vocabulary "
                    f"(ids 0 to {vocabulary - 1})",
                )
