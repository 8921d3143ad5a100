"""The OpenAI-compatible HTTP API, separate from any model: `build_api(engine, settings)`.

Routes parse and validate, call the `Engine`, and shape JSON, Server-Sent Events and errors
the way OpenAI clients expect; the Ray Serve deployment (app.py) mounts this FastAPI app.

    GET  /health                200 {"status": "ok"}            (no auth: for probes)
    GET  /v1/models             the one served model
    POST /v1/completions        prompt -> text      (stream: SSE chunks, then data: [DONE])
    POST /v1/chat/completions   messages -> message (chat template of the tokenizer)

Errors carry OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 bad JSON or
fields, prompt over maxPromptTokens, max_tokens over maxNewTokens; 401 missing or wrong bearer
key; 404 unknown model; 503 over capacity (at once, never queued without bound).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from llmray_serve.engine import Chunk, Engine, EngineOverloaded, SamplingParams, Usage
from llmray_serve.protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngressSettings:
    served_name: str  # the id in /v1/models, e.g. "smollm2-support"
    max_new_tokens: int = 256  # default and upper bound of max_tokens
    max_prompt_tokens: int = 2048
    temperature: float = 0.7  # defaults when a request leaves them out
    top_p: float = 0.95
    api_key: str | None = None  # bearer key; None: no auth


class Metrics(Protocol):
    """What the ingress reports (Ray Serve's Prometheus metrics in app.py; no-ops in tests)."""

    def request_done(self, route: str, status: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def tokens(self, prompt: int, completion: int) -> None: ...


class NoMetrics:
    def request_done(self, route: str, status: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def tokens(self, prompt: int, completion: int) -> None:
        pass


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param=param, code=code)
        self.headers = headers


def build_api(engine: Engine, settings: IngressSettings, metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="llmray", docs_url=None, redoc_url=None)
    created = int(time.time())
    metrics = metrics or NoMetrics()

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        metrics.request_done(request.url.path, response.status_code)
        # OpenAI's header: the time spent in this server (to the first byte when streaming);
        # a client's latency minus this is the network and proxy overhead.
        response.headers["openai-processing-ms"] = f"{(time.perf_counter() - started) * 1e3:.1f}"
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        body = error_body(f"the server failed to answer: {exc}", "server_error")
        return JSONResponse(body, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc.errors()), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request, settings.api_key)
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.served_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "llmray",
                }
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request):
        check_key(request, settings.api_key)
        prompt = str(body.prompt)
        shape = _CompletionShape(body)
        return await respond(engine, settings, body, prompt, "prompt", shape, metrics)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request):
        check_key(request, settings.api_key)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = engine.render_chat(messages)
        shape = _ChatShape(body)
        return await respond(engine, settings, body, prompt, "messages", shape, metrics)

    return app


def check_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(
            401,
            "missing or invalid API key: send Authorization: Bearer <key>",
            "invalid_request_error",
            code="invalid_api_key",
        )


def validation_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_body("the request body is not valid JSON", "invalid_request_error")
    parts, param = [], None
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        param = param or loc or None
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return error_body("; ".join(parts), "invalid_request_error", param=param)


def sampling(settings: IngressSettings, body: Any) -> SamplingParams:
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if wanted is not None and wanted > settings.max_new_tokens:
        raise ApiError(
            400,
            f"max_tokens {wanted} exceeds this deployment's limit "
            f"(generation.maxNewTokens {settings.max_new_tokens})",
            param="max_tokens",
        )
    return SamplingParams(
        max_tokens=wanted or settings.max_new_tokens,
        temperature=settings.temperature if body.temperature is None else body.temperature,
        top_p=settings.top_p if body.top_p is None else body.top_p,
        stop=tuple(body.stop or ()),
        seed=body.seed,
        stream=bool(body.stream),
    )


async def respond(
    engine: Engine,
    settings: IngressSettings,
    body: Any,
    prompt: str,
    prompt_param: str,
    shape: _Shape,
    metrics: Metrics,
):
    started = time.perf_counter()
    if body.model != settings.served_name:
        raise ApiError(
            404,
            f"model {body.model!r} does not exist; this server serves {settings.served_name!r}",
            param="model",
            code="model_not_found",
        )
    params = sampling(settings, body)
    tokens = engine.count_tokens(prompt)
    if tokens > settings.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {tokens} tokens, more than this deployment's "
            f"limit (generation.maxPromptTokens {settings.max_prompt_tokens})",
            param=prompt_param,
            code="context_length_exceeded",
        )
    chunks = engine.generate(prompt, params)
    try:  # the first chunk decides the status: 503 now, not inside a 200 stream
        first = await anext(chunks)
    except EngineOverloaded as exc:
        await chunks.aclose()
        raise ApiError(
            503,
            f"the server is at capacity, retry later ({exc})",
            "server_error",
            code="overloaded",
            headers={"Retry-After": "1"},
        ) from exc
    except StopAsyncIteration:
        first = Chunk("", tokens, 0, "stop")
    if body.stream:  # a plain request's first chunk is its whole answer
        metrics.first_token(time.perf_counter() - started)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            sse(first, chunks, shape, include_usage, metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    text, finish, usage = (
        first.text,
        first.finish_reason,
        Usage(first.prompt_tokens, first.completion_tokens),
    )
    async for chunk in chunks:
        text += chunk.text
        finish = chunk.finish_reason or finish
        usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)
    metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
    return shape.full(text, finish or "stop", usage)


async def sse(
    first: Chunk,
    rest: AsyncIterator[Chunk],
    shape: _Shape,
    include_usage: bool,
    metrics: Metrics,
) -> AsyncIterator[str]:
    """`data: {chunk}` events, then `data: [DONE]`; a client that leaves closes `rest`."""
    usage = Usage(first.prompt_tokens, first.completion_tokens)
    try:
        yield _event(shape.chunk(first.text, first.finish_reason, is_first=True))
        async for chunk in rest:
            usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)
            yield _event(shape.chunk(chunk.text, chunk.finish_reason, is_first=False))
        if include_usage:
            yield _event(shape.usage_chunk(usage))
        yield "data: [DONE]\n\n"
    finally:
        await rest.aclose()  # cancels the generation when the client disconnected
        metrics.tokens(usage.prompt_tokens, usage.completion_tokens)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


class _Shape:
    """The JSON of one endpoint: full response, stream chunk, usage chunk."""

    object_full: str
    object_chunk: str
    prefix: str

    def __init__(self, body: Any) -> None:
        self.model, self.created = body.model, int(time.time())
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._envelope(self.object_chunk, []) | {"usage": _usage(usage)}

    def choice_full(self, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def choice_chunk(self, text: str, finish: str | None, is_first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def full(self, text: str, finish: str, usage: Usage) -> dict[str, Any]:
        return self._envelope(self.object_full, [self.choice_full(text, finish)]) | {
            "usage": _usage(usage)
        }

    def chunk(self, text: str, finish: str | None, *, is_first: bool) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self.choice_chunk(text, finish, is_first)])


class _CompletionShape(_Shape):
    object_full = object_chunk = "text_completion"
    prefix = "cmpl"

    def choice_full(self, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def choice_chunk(self, text: str, finish: str | None, is_first: bool) -> dict[str, Any]:
        return self.choice_full(text, finish)  # type: ignore[arg-type]


class _ChatShape(_Shape):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def choice_full(self, text: str, finish: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }

    def choice_chunk(self, text: str, finish: str | None, is_first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if is_first else {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish}
