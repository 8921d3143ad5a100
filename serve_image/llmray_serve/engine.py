"""What the OpenAI ingress needs from a model: the engine interface, and its value types.

The ingress (routes, formats, errors, SSE) never touches a model: it calls an `Engine`. The
transformers and vLLM engines implement it; route tests use a fake one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True  # False: the caller reads only the whole answer (engines may batch it)


@dataclass
class Chunk:
    """New text of one request since the last chunk; `finish_reason` set on the last one."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineOverloaded(Exception):
    """The engine holds all the requests it may: the ingress answers 503 at once."""


class Engine(Protocol):
    def count_tokens(self, text: str) -> int:
        """Tokens of a prompt as the model will see it."""
        ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """A chat as the prompt text (the tokenizer's chat template, or llmray's default)."""
        ...

    def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream the completion. Closing the iterator early cancels the generation."""
        ...


@dataclass
class Collected:
    text: str = ""
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)


async def collect(chunks: AsyncIterator[Chunk]) -> Collected:
    out = Collected()
    async for chunk in chunks:
        out.text += chunk.text
        out.usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)
        if chunk.finish_reason:
            out.finish_reason = chunk.finish_reason
    return out
