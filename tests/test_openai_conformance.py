"""Every response shape of the ingress validates against OpenAI's published schemas
(tests/openai_schema.py): lists, models, completions, chat completions, stream chunks and the
error bodies of each status. The fake engine of test_serve_routes; the real server's answers
are checked the same way in test_serve.py."""

from __future__ import annotations

import json

import httpx
import pytest

from llmray_serve.ingress import IngressSettings, build_api
from tests.openai_schema import validate
from tests.test_serve_routes import FakeEngine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny", "prompt": "say it", "max_tokens": 4}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


async def call(engine, method: str, path: str, **kwargs) -> httpx.Response:
    app = build_api(
        engine, IngressSettings(served_name="tiny", max_new_tokens=16, max_prompt_tokens=50)
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
        return await http.request(method, path, **kwargs)


def events(response: httpx.Response) -> list[dict]:
    data = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_models(engine) -> None:
    validate((await call(engine, "GET", "/v1/models")).json(), "ListModelsResponse")
    validate((await call(engine, "GET", "/v1/models/tiny")).json(), "Model")


async def test_completion_and_its_stream(engine) -> None:
    validate((await call(engine, "POST", "/v1/completions", json=COMPLETION)).json(),
             "CreateCompletionResponse")  # fmt: skip
    stream = await call(engine, "POST", "/v1/completions", json={**COMPLETION, "stream": True})
    chunks = events(stream)
    # OpenAI streams completions in the response's own schema, whose finish_reason cannot be
    # null; its streams (and the openai client) still carry null until the last chunk.
    for chunk in chunks[:-1]:
        assert [c["finish_reason"] for c in chunk["choices"]] == [None]
        chunk["choices"][0]["finish_reason"] = "length"
    for chunk in chunks:
        validate(chunk, "CreateCompletionResponse")


async def test_chat_completion_and_its_stream(engine) -> None:
    full = (await call(engine, "POST", "/v1/chat/completions", json=CHAT)).json()
    validate(full, "CreateChatCompletionResponse")
    assert full["choices"][0]["message"]["refusal"] is None  # required, null when unused
    assert full["choices"][0]["logprobs"] is None
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(await call(engine, "POST", "/v1/chat/completions", json=body))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/completions", {"model": "tiny"}, 400),
        ("POST", "/v1/chat/completions", {**CHAT, "store": True}, 400),
        ("POST", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400),
        ("POST", "/v1/completions", {**COMPLETION, "model": "other"}, 404),
        ("GET", "/v1/models/other", None, 404),
        ("GET", "/v1/nothing-here", None, 404),
        ("DELETE", "/v1/chat/completions", None, 405),
    ],
)
async def test_error_bodies(engine, method, path, body, status) -> None:
    r = await call(engine, method, path, json=body)
    assert r.status_code == status
    validate(r.json(), "ErrorResponse")


async def test_error_bodies_of_503_and_500(engine) -> None:
    engine.overloaded = True
    r = await call(engine, "POST", "/v1/completions", json=COMPLETION)
    assert r.status_code == 503
    validate(r.json(), "ErrorResponse")
    engine.overloaded, engine.broken = False, True
    r = await call(engine, "POST", "/v1/completions", json=COMPLETION)
    assert r.status_code == 500
    validate(r.json(), "ErrorResponse")
