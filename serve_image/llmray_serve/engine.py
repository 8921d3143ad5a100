"""What the OpenAI ingress needs from a model: the engine interface, and its value types.

The ingress (routes, formats, errors, SSE) never touches a model: it calls an `Engine`. The
transformers and vLLM engines implement it; route tests use a fake one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True  # False: the caller reads only the whole answer (engines may batch it)
    n: int = 1  # choices, sampled independently from one prompt (which they share)
    # Log-probabilities: None, none; k, each generated token's and its k most likely
    # alternatives'; prompt_logprobs the same for the prompt's tokens (the first has none).
    # They are the model's own (before temperature, penalties, bias and grammar), as vLLM's.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI's / vLLM's: over the tokens generated so far
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # llguidance Lark grammar the answer must match (grammars.py)
    adapter: str | None = None  # the LoRA adapter answering (loaded by the engine), None: base


@dataclass(frozen=True)
class TokenLogprob:
    token: str  # the token's text
    logprob: float | None  # None: the prompt's first token (nothing comes before it)
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens there, best first
    id: int | None = None  # the token's id in the model's vocabulary (not sent to clients)


@dataclass
class Chunk:
    """New text of choice `index` since its last chunk; `finish_reason` on its last one."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # of this choice, so far
    finish_reason: str | None = None  # "stop" | "length"
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens this chunk adds
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on a choice's first chunk


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineOverloaded(Exception):
    """The engine holds all the requests it may: the ingress answers 503 at once."""


class EngineUnavailable(Exception):
    """The engine cannot generate any more (its generation loop died or is stuck): the ingress
    answers 503 at once, and the replica's health check fails so Ray Serve replaces it."""


class InvalidPrompt(ValueError):
    """The model cannot take this prompt (e.g. empty, with no token to start from): a 400."""


class InvalidParameter(ValueError):
    """A parameter this model or engine cannot take (a token id past the vocabulary, a
    feature the engine lacks): a 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Engine(Protocol):
    """What the ingress and the Ray Serve deployment (app.py) call; nothing else."""

    # The format this model's chat template writes tool calls in (llmray.chat.TOOL_FORMATS).
    tool_format: str
    # The precision the model runs in (hf_model.Precision: dtype, quantization, why), for
    # /v1/models, the log and the llmray_model_info metric.
    precision: Any

    def count_tokens(self, text: str) -> int:
        """Tokens of a prompt as the model will see it (InvalidPrompt if it cannot take it)."""
        ...

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """A chat as the prompt text (the tokenizer's chat template, or llmray's default; with
        tools, the template that renders them: llmray.chat.template_for_tools)."""
        ...

    def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream the completion's choices (chunks of different choices interleave). Closing
        the iterator early cancels the generation. Raises EngineOverloaded /
        EngineUnavailable / InvalidPrompt / InvalidParameter before the first chunk; a
        failure while generating fails this request only."""
        ...

    def healthy(self) -> bool:
        """False once the engine cannot answer any more (its generation loop died): the
        replica's health check then fails and Ray Serve replaces the replica."""
        ...

    def close(self) -> None:
        """Stop generating and free the model's memory (the replica is shutting down)."""
        ...


class AdapterEngine(Protocol):
    """An engine that serves LoRA adapters on its base model (adapter_registry.py calls it):
    `SamplingParams.adapter` names a loaded one."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Make adapter `name` (a PEFT folder) usable by requests; raises if it does not fit
        the model."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Free adapter `name`; no request of it is in flight (the registry waits for that)."""
        ...


@dataclass
class Collected:
    """One choice, whole."""

    text: str = ""
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class CollectedAll:
    choices: dict[int, Collected] = field(default_factory=dict)
    prompt_tokens: int = 0

    @property
    def usage(self) -> Usage:
        completion = sum(c.completion_tokens for c in self.choices.values())
        return Usage(self.prompt_tokens, completion)

    @property
    def text(self) -> str:  # of the first choice (the only one unless n > 1)
        return self.choices.get(0, Collected()).text

    @property
    def finish_reason(self) -> str:
        return self.choices.get(0, Collected()).finish_reason

    def add(self, chunk: Chunk) -> None:
        choice = self.choices.setdefault(chunk.index, Collected())
        choice.text += chunk.text
        choice.completion_tokens = chunk.completion_tokens
        choice.logprobs.extend(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            choice.prompt_logprobs = chunk.prompt_logprobs
        if chunk.finish_reason:
            choice.finish_reason = chunk.finish_reason
        self.prompt_tokens = chunk.prompt_tokens


async def collect(chunks: AsyncIterator[Chunk], first: Chunk | None = None) -> CollectedAll:
    """Every choice of a generation, whole; `first`: a chunk the caller already took from it."""
    out = CollectedAll()
    if first is not None:
        out.add(first)
    async for chunk in chunks:
        out.add(chunk)
    return out
