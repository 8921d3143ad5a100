"""OpenAI's response JSON, whole and streamed: choices, logprobs, tool calls, usage.

A `Shape` turns the engine's chunks (engine.py: each of one choice, `index`) into one
endpoint's JSON. `full(done)` is the plain response; `chunks(chunk)` the stream events one
engine chunk gives, each carrying one choice, as OpenAI streams them:

    chat      {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                            "logprobs": {"content": [...]}, "finish_reason": null}]}
              tool calls: {"tool_calls": [{"index": 0, "id": "call_..", "type": "function",
                            "function": {"name": "f", "arguments": ""}}]}, then
                          {"tool_calls": [{"index": 0, "function": {"arguments": "{..}"}}]}
    completion {"choices": [{"index": 0, "text": "Hi", "logprobs": {"tokens": [...],
                "token_logprobs": [...], "top_logprobs": [...], "text_offset": [...]}}]}

Tool calls are read out of the text by the model family's parser (tool_parsers.py); a call
reaches the stream once it is complete (its arguments in the second delta), text that may be
the start of a call waits until it is told apart.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from llmray_serve.chat_tools import ChatPlan
from llmray_serve.engine import Chunk, Collected, CollectedAll, TokenLogprob, Usage
from llmray_serve.tool_parsers import Call, Content, Event


def usage_json(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


class Shape:
    """The JSON of one endpoint: full response, stream events, usage event."""

    object_full: str
    object_chunk: str
    prefix: str

    def __init__(self, body: Any) -> None:
        self.model, self.created = body.model, int(time.time())
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def full(self, done: CollectedAll) -> dict[str, Any]:
        choices = [self.choice(i, c) for i, c in sorted(done.choices.items())]
        return self.envelope(self.object_full, choices) | {"usage": usage_json(done.usage)}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self.envelope(self.object_chunk, []) | {"usage": usage_json(usage)}

    def choice(self, index: int, done: Collected) -> dict[str, Any]:
        raise NotImplementedError

    def chunks(self, chunk: Chunk) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionShape(Shape):
    object_full = object_chunk = "text_completion"
    prefix = "cmpl"

    def __init__(self, body: Any, prompt: str) -> None:
        super().__init__(body)
        self.echo = prompt if body.echo else ""
        self.want_logprobs = body.logprobs is not None
        self.offsets: dict[int, int] = {}  # choice -> characters sent (text_offset)

    def choice(self, index: int, done: Collected) -> dict[str, Any]:
        tokens = list(done.prompt_logprobs or ()) if self.echo else []
        return {
            "index": index,
            "text": self.echo + done.text,
            "logprobs": completion_logprobs(tokens + done.logprobs, 0)
            if self.want_logprobs
            else None,
            "finish_reason": done.finish_reason,
        }

    def chunks(self, chunk: Chunk) -> list[dict[str, Any]]:
        first = chunk.index not in self.offsets
        text, tokens = chunk.text, list(chunk.logprobs)
        if first and self.echo:
            text, tokens = self.echo + text, list(chunk.prompt_logprobs or ()) + tokens
        offset = self.offsets.get(chunk.index, 0)
        self.offsets[chunk.index] = offset + len(text)
        choice = {
            "index": chunk.index,
            "text": text,
            "logprobs": completion_logprobs(tokens, offset) if self.want_logprobs else None,
            "finish_reason": chunk.finish_reason,
        }
        return [self.envelope(self.object_chunk, [choice])]


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """/v1/completions' logprobs: per token its text, logprob, top alternatives (with the
    token itself, as OpenAI and vLLM send them: up to `logprobs` + 1) and character offset.
    The prompt's first token has none: null, as OpenAI sends it (its published schema says
    number there)."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for t in tokens:
        out["tokens"].append(t.token)
        out["token_logprobs"].append(t.logprob)
        top = None if t.logprob is None else {**dict(t.top), t.token: t.logprob}
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(t.token)
    return out


def chat_logprobs(tokens: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [
        entry(t.token, t.logprob or 0.0) | {"top_logprobs": [entry(a, b) for a, b in t.top]}
        for t in tokens
    ]
    return {"content": content, "refusal": None}


class _ChatChoice:
    """A streamed chat choice: its tool-call parser and what it has sent."""

    def __init__(self, plan: ChatPlan) -> None:
        self.tools = plan.parser.stream(plan.names) if plan.parser else None
        self.started = False
        self.calls = 0
        self.logprobs: list[TokenLogprob] = []  # not yet sent (their text is held back)


class ChatShape(Shape):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, body: Any, plan: ChatPlan) -> None:
        super().__init__(body)
        self.plan = plan
        self.want_logprobs = bool(body.logprobs)
        self.streams: dict[int, _ChatChoice] = {}

    def choice(self, index: int, done: Collected) -> dict[str, Any]:
        events = _events(_ChatChoice(self.plan), done.text, last=True)
        content = "".join(e.text for e in events if isinstance(e, Content))
        calls = [e for e in events if isinstance(e, Call)]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = [
                {
                    "id": _call_id(),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        return {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(done.logprobs) if self.want_logprobs else None,
            "finish_reason": "tool_calls" if calls else done.finish_reason,
        }

    def chunks(self, chunk: Chunk) -> list[dict[str, Any]]:
        state = self.streams.setdefault(chunk.index, _ChatChoice(self.plan))
        state.logprobs.extend(chunk.logprobs)
        deltas: list[dict[str, Any]] = []
        for event in _events(state, chunk.text, last=chunk.finish_reason is not None):
            if isinstance(event, Content):
                deltas.append({"content": event.text})
            else:
                deltas += _call_deltas(event, state.calls)
                state.calls += 1
        if not state.started and not deltas:
            deltas.append({"content": ""})  # the role comes first, even before any text
        if chunk.finish_reason and not deltas:
            deltas.append({})
        out = []
        for i, delta in enumerate(deltas):
            if not state.started:
                delta, state.started = {"role": "assistant", **delta}, True
            logprobs = None
            if self.want_logprobs and (i == 0 or i == len(deltas) - 1) and state.logprobs:
                logprobs, state.logprobs = chat_logprobs(state.logprobs), []
            last = chunk.finish_reason is not None and i == len(deltas) - 1
            finish = ("tool_calls" if state.calls else chunk.finish_reason) if last else None
            choice = {
                "index": chunk.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            out.append(self.envelope(self.object_chunk, [choice]))
        return out


def _events(state: _ChatChoice, text: str, *, last: bool) -> list[Event]:
    if state.tools is None:
        return [Content(text)] if text else []
    events = state.tools.feed(text) if text else []
    return events + state.tools.finish() if last else events


def _call_deltas(call: Call, index: int) -> list[dict[str, Any]]:
    """OpenAI streams a call as its id and name, then its arguments."""
    return [
        {
            "tool_calls": [
                {
                    "index": index,
                    "id": _call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
    ]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def sse(
    first: Chunk, rest: AsyncIterator[Chunk], shape: Shape, include_usage: bool, metrics: Any
) -> AsyncIterator[str]:
    """`data: {chunk}` events, then `data: [DONE]`; a client that leaves closes `rest`."""
    done = CollectedAll()
    try:
        for chunk in (first,):
            done.add(_counted(chunk))
            for payload in shape.chunks(chunk):
                yield event(payload)
        async for chunk in rest:
            done.add(_counted(chunk))
            for payload in shape.chunks(chunk):
                yield event(payload)
        if include_usage:
            yield event(shape.usage_chunk(done.usage))
        yield "data: [DONE]\n\n"
    finally:
        await rest.aclose()  # cancels the generation when the client disconnected
        metrics.tokens(done.usage.prompt_tokens, done.usage.completion_tokens)


def _counted(chunk: Chunk) -> Chunk:
    """The chunk for counting only (its text and logprobs are the shape's)."""
    return Chunk("", chunk.prompt_tokens, chunk.completion_tokens, chunk.finish_reason, chunk.index)


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
