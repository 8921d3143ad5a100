"""The OpenAI-compatible HTTP API, separate from any model: `build_api(engine, settings)`.

Routes parse and validate, call the `Engine`, and shape JSON, Server-Sent Events and errors
the way OpenAI clients expect; the Ray Serve deployment (app.py) mounts this FastAPI app.

    GET  /health                200 {"status": "ok"}            (no auth: for probes)
    GET  /v1/models             the served model, and each ready LoRA adapter (parent: the model)
    GET  /v1/models/{model}     one of them, or 404 (an adapter not ready yet: a 404 saying why)
    POST /v1/completions        prompt -> text      (stream: SSE chunks, then data: [DONE])
    POST /v1/chat/completions   messages -> message (chat template of the tokenizer)

Parameters: protocol.py (each OpenAI parameter honoured or refused by name); max_tokens over
maxNewTokens is that limit. Chat tools and response_format: chat_tools.py (what they ask of
the model, the grammar that enforces it), responses.py (tool calls, logprobs, n choices in
OpenAI's JSON and stream events). Errors carry OpenAI's body {"error": {"message", "type", "param",
"code"}}: 400 bad JSON or fields, a parameter not implemented, prompt over maxPromptTokens;
404 unknown route or model, 405 wrong method; 401 missing or wrong bearer
key (checked before the body is read); 404 unknown model; 503 over capacity or while the
engine cannot generate (at once, never queued without bound); 500 with a request id only (the
cause goes to the log under that id). Metrics label requests by route template.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from llmray.api import llmdeployment as generation
from llmray_serve.adapter_registry import AdapterNotReady, AdapterRegistry, UnknownModel
from llmray_serve.chat_tools import plan_chat
from llmray_serve.engine import (
    Chunk,
    Engine,
    EngineOverloaded,
    EngineUnavailable,
    InvalidParameter,
    InvalidPrompt,
    SamplingParams,
    collect,
)
from llmray_serve.grammars import GrammarError
from llmray_serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from llmray_serve.responses import ChatShape, CompletionShape, Shape, sse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngressSettings:
    served_name: str  # the id in /v1/models, e.g. "smollm2-support"
    max_new_tokens: int = generation.MAX_NEW_TOKENS  # default and upper bound of max_tokens
    max_prompt_tokens: int = generation.MAX_PROMPT_TOKENS
    temperature: float = generation.TEMPERATURE  # defaults when a request leaves them out
    top_p: float = generation.TOP_P
    api_key: str | None = None  # bearer key; None: no auth
    # Extra fields of the model object in /v1/models, e.g. {"dtype": "bfloat16",
    # "quantization": "none"}: the precision the engine runs in.
    model_details: Mapping[str, str] = field(default_factory=dict)


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


def build_api(
    engine: Engine,
    settings: IngressSettings,
    metrics: Metrics | None = None,
    adapters: AdapterRegistry | None = None,
) -> FastAPI:
    """`adapters`: the replica's LoRA adapters (a request's `model` picks one), or None."""
    app = FastAPI(title="llmray", docs_url=None, redoc_url=None)
    created = int(time.time())
    metrics = metrics or NoMetrics()

    if settings.api_key is not None:  # before the metrics below: they count the 401s too
        app.add_middleware(BearerKey, key=settings.api_key)

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        metrics.request_done(route_label(request.scope), response.status_code)
        # OpenAI's header: the time spent in this server (to the first byte when streaming);
        # a client's latency minus this is the network and proxy overhead.
        response.headers["openai-processing-ms"] = f"{(time.perf_counter() - started) * 1e3:.1f}"
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:
        # The cause goes to the log, not to the client (it can hold paths, shapes, internals);
        # the id ties one to the other.
        request_id = f"req_{uuid.uuid4().hex}"
        log.error("request %s failed", request_id, exc_info=exc)
        body = error_body(
            f"the server failed to answer this request (request id {request_id}; "
            "its cause is in the server's log)",
            "server_error",
        )
        return JSONResponse(body, status_code=500, headers={"x-request-id": request_id})

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's shape.
        message = {
            404: f"no route {request.method} {request.url.path} on this server",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(message, "invalid_request_error", code=code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc.errors()), status_code=400)

    @app.get("/health", response_model=None)
    async def health() -> dict[str, str] | JSONResponse:
        if not engine.healthy():
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return {"status": "ok"}

    the_model = {
        "id": settings.served_name,
        "object": "model",
        "created": created,
        "owned_by": "llmray",
        **settings.model_details,
    }

    def adapter_model(name: str) -> dict[str, Any]:
        return the_model | {"id": name, "parent": settings.served_name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        listed = [adapter_model(a) for a in adapters.ready()] if adapters else []
        return {"object": "list", "data": [the_model, *listed]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        adapter = check_model(model, settings, adapters)
        return the_model if adapter is None else adapter_model(adapter)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest):
        adapter = check_model(body.model, settings, adapters)
        prompt = str(body.prompt)
        echo_logprobs = body.logprobs if body.echo else None
        params = sampling(settings, body, logprobs=body.logprobs, prompt_logprobs=echo_logprobs)
        shape = CompletionShape(body, prompt)
        return await respond(
            engine, settings, body, prompt, "prompt", shape, metrics, params, served(adapter)
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest):
        adapter = check_model(body.model, settings, adapters)
        try:
            plan = plan_chat(body, engine.tool_format)
        except GrammarError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        try:
            prompt = engine.render_chat([m.for_template() for m in body.messages], plan.tools)
        except InvalidPrompt as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(settings, body, logprobs=top, grammar=plan.grammar)
        shape = ChatShape(body, plan)
        return await respond(
            engine, settings, body, prompt, "messages", shape, metrics, params, served(adapter)
        )

    def served(adapter: str | None) -> Served:
        return Served(adapters, adapter) if adapter is not None and adapters else Served()

    return app


OPEN_PATHS = frozenset({"/health"})  # no key: for probes


class BearerKey:
    """The bearer key, checked before anything reads the request body (a plain ASGI
    middleware, outside FastAPI's body parsing): an unauthenticated 10 MB body gets its 401
    without being read, let alone parsed."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.key):
                body = error_body(
                    "missing or invalid API key: send Authorization: Bearer <key>",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def route_label(scope: Scope) -> str:
    """The route's template (e.g. /v1/models/{model}), never the raw path: a metric label per
    path a client invents would grow Prometheus without bound."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def check_model(
    name: str, settings: IngressSettings, adapters: AdapterRegistry | None = None
) -> str | None:
    """The adapter a request's `model` names, None for the base model; 404 otherwise."""
    if adapters is not None:
        try:
            return adapters.resolve(name)
        except (UnknownModel, AdapterNotReady) as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from exc
    if name != settings.served_name:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {settings.served_name!r}",
            param="model",
            code="model_not_found",
        )
    return None


@dataclass(frozen=True)
class Served:
    """Who answers a request: the base model, or adapter `adapter` of `adapters`."""

    adapters: AdapterRegistry | None = None
    adapter: str | None = None


def validation_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_body("the request body is not valid JSON", "invalid_request_error")
    parts, param = [], None
    for e in errors:
        # pydantic names the member of a union it tried (prompt.str, prompt.list[str]): the
        # client sent one field, `prompt`.
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body" and not _type_tag(p))
        param = param or loc or None
        part = f"{loc}: {e.get('msg')}" if loc else str(e.get("msg"))
        if part not in parts:
            parts.append(part)
    return error_body("; ".join(parts), "invalid_request_error", param=param)


def _type_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part
    )


def sampling(settings: IngressSettings, body: Any, **extra: Any) -> SamplingParams:
    """The request's sampling, with the deployment's defaults. A max_tokens above
    generation.maxNewTokens is that limit (clients send large defaults): the answer then ends
    with finish_reason "length" where the limit cut it. `extra`: the endpoint's own fields
    (logprobs, grammar)."""
    wanted = getattr(body, "max_completion_tokens", None)
    wanted = body.max_tokens if wanted is None else wanted
    temperature = settings.temperature if body.temperature is None else body.temperature
    top_p = settings.top_p if body.top_p is None else body.top_p
    if top_p == 0:  # the smallest set of tokens with probability >= 0: the top token
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_tokens=min(
            settings.max_new_tokens if wanted is None else wanted, settings.max_new_tokens
        ),
        temperature=temperature,
        top_p=top_p,
        stop=tuple(body.stop or ()),
        seed=body.seed,
        stream=bool(body.stream),
        n=body.n or 1,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple((int(t), float(b)) for t, b in (body.logit_bias or {}).items()),
        **extra,
    )


async def respond(
    engine: Engine,
    settings: IngressSettings,
    body: Any,
    prompt: str,
    prompt_param: str,
    shape: Shape,
    metrics: Metrics,
    params: SamplingParams,
    served: Served,
):
    started = time.perf_counter()
    try:
        tokens = engine.count_tokens(prompt)
    except InvalidPrompt as exc:
        raise ApiError(400, str(exc), param=prompt_param) from exc
    if tokens > settings.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {tokens} tokens, more than this deployment's "
            f"limit (generation.maxPromptTokens {settings.max_prompt_tokens})",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if served.adapters is not None and served.adapter is not None:
        chunks = _with_adapter(served.adapters, served.adapter, engine, prompt, params, tokens)
    else:
        chunks = _generate(engine, prompt, params, tokens)
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
    except EngineUnavailable as exc:  # this replica is being replaced: another one answers
        await chunks.aclose()
        raise ApiError(
            503,
            f"this server cannot generate at the moment, retry ({exc})",
            "server_error",
            code="unavailable",
            headers={"Retry-After": "1"},
        ) from exc
    except InvalidPrompt as exc:
        await chunks.aclose()
        raise ApiError(400, str(exc), param=prompt_param) from exc
    except (UnknownModel, AdapterNotReady) as exc:  # the adapter went while this one waited
        await chunks.aclose()
        raise ApiError(404, str(exc), param="model", code="model_not_found") from exc
    except InvalidParameter as exc:
        await chunks.aclose()
        raise ApiError(400, str(exc), param=exc.param) from exc
    except StopAsyncIteration:
        first = Chunk("", tokens, 0, "stop")
    if body.stream:  # a plain request's first chunk is its whole answer
        metrics.first_token(time.perf_counter() - started)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            sse(first, chunks, shape, include_usage, metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    done = await collect(chunks, first)
    metrics.tokens(done.usage.prompt_tokens, done.usage.completion_tokens)
    return shape.full(done)


def _generate(
    engine: Engine, prompt: str, params: SamplingParams, prompt_tokens: int
) -> AsyncIterator[Chunk]:
    """The engine's chunks; max_tokens 0 (OpenAI allows it) asks the engine for nothing, or,
    with the prompt's logprobs wanted (echo: what lm-eval-harness scores prompts with), for
    one token that is then left out, as vLLM does."""
    if params.max_tokens == 0 and params.prompt_logprobs is None:
        return _nothing(params.n, prompt_tokens)
    if params.max_tokens == 0:
        return _prompt_only(engine.generate(prompt, replace(params, max_tokens=1)))
    return engine.generate(prompt, params)


async def _with_adapter(
    adapters: AdapterRegistry,
    adapter: str,
    engine: Engine,
    prompt: str,
    params: SamplingParams,
    prompt_tokens: int,
) -> AsyncIterator[Chunk]:
    """The engine's chunks under `adapter`, held in the engine (not evicted) until the last
    one, or until the client leaves (the engine's own generation is closed first: it frees
    its batch slot at once)."""
    async with adapters.use(adapter) as key:
        chunks = _generate(engine, prompt, replace(params, adapter=key), prompt_tokens)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]


async def _nothing(n: int, prompt_tokens: int) -> AsyncIterator[Chunk]:
    for index in range(n):
        yield Chunk("", prompt_tokens, 0, "length", index)


async def _prompt_only(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    try:
        async for c in chunks:
            if c.finish_reason or c.prompt_logprobs is not None:
                finish = "length" if c.finish_reason else None
                yield Chunk("", c.prompt_tokens, 0, finish, c.index, (), c.prompt_logprobs)
    finally:
        await chunks.aclose()
