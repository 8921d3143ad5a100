"""The OpenAI ingress with a fake engine: formats, streaming, errors, auth, limits.

The official `openai` client talks to the FastAPI app in-process (httpx's ASGI transport);
the model-backed engines and Ray Serve over real HTTP are tested in test_serve.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from llmray_serve.engine import Chunk, EngineOverloaded, SamplingParams
from llmray_serve.ingress import IngressSettings, build_api

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


class FakeEngine:
    """Words are tokens; it answers the first words of WORDS, honouring max_tokens and stop."""

    def __init__(self) -> None:
        self.overloaded = False
        self.broken = False
        self.closed_early = 0
        self.seen: list[tuple[str, SamplingParams]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        if self.overloaded:
            raise EngineOverloaded("2 requests ongoing, limit 2")
        if self.broken:
            raise RuntimeError("the device fell off the bus")
        self.seen.append((prompt, params))
        n_prompt, done = self.count_tokens(prompt), 0
        try:
            for word in WORDS[: params.max_tokens]:
                if word in params.stop:
                    yield Chunk("", n_prompt, done, "stop")
                    return
                done += 1
                await asyncio.sleep(0)
                last = done == min(params.max_tokens, len(WORDS))
                finish = ("length" if params.max_tokens <= len(WORDS) else "stop") if last else None
                yield Chunk((" " if done > 1 else "") + word, n_prompt, done, finish)
        except GeneratorExit:
            self.closed_early += 1
            raise


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def client_for(engine: FakeEngine, **settings) -> openai.AsyncOpenAI:
    app = build_api(
        engine,
        IngressSettings(served_name="tiny", max_new_tokens=16, max_prompt_tokens=50, **settings),
    )
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llmray")
    return openai.AsyncOpenAI(
        base_url="http://llmray/v1",
        api_key=settings.get("api_key") or "x",
        http_client=http,
        max_retries=0,
    )


async def test_models_lists_the_served_name(engine) -> None:
    models = await client_for(engine).models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_completion_with_usage_and_length_finish(engine) -> None:
    done = await client_for(engine).completions.create(model="tiny", prompt="say it", max_tokens=3)
    assert done.choices[0].text == "the quick brown"
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 3)
    assert done.usage.total_tokens == 5


async def test_chat_uses_the_template_and_defaults(engine) -> None:
    done = await client_for(engine, temperature=0.3).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stop=["fox"]
    )
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == "the quick brown"
    assert done.choices[0].finish_reason == "stop"
    prompt, params = engine.seen[-1]
    assert prompt == "user: hi\nassistant:"
    assert params.temperature == 0.3 and params.max_tokens == 16 and params.stop == ("fox",)


async def test_stream_reassembles_to_the_full_answer(engine) -> None:
    client = client_for(engine)
    full = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=1
    )
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


async def test_stream_ends_with_done(engine) -> None:
    app = build_api(engine, IngressSettings(served_name="tiny"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://x"
    ) as http:
        r = await http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True},
        )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


async def raw(
    engine: FakeEngine, path: str, content: bytes | None = None, json=None, headers=None, **settings
) -> httpx.Response:
    app = build_api(
        engine,
        IngressSettings(served_name="tiny", max_new_tokens=16, max_prompt_tokens=5, **settings),
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://x"
    ) as http:
        return await http.post(path, content=content, json=json, headers=headers)


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        (b"{not json", 400, "not valid JSON", None),
        ({"model": "tiny"}, 400, "prompt: Field required", "prompt"),
        ({"model": "tiny", "prompt": "a", "temperature": 5}, 400, "temperature", "temperature"),
        ({"model": "tiny", "prompt": "a", "n": 2}, 400, "n:", "n"),
        ({"model": "other", "prompt": "a"}, 404, "model 'other' does not exist", "model"),
        (
            {"model": "tiny", "prompt": "a b c d e f g"},
            400,
            "7 tokens, more than this deployment's limit (generation.maxPromptTokens 5)",
            "prompt",
        ),
        (
            {"model": "tiny", "prompt": "a", "max_tokens": 99},
            400,
            "generation.maxNewTokens 16",
            "max_tokens",
        ),
    ],
)
async def test_bad_requests_get_openai_errors(engine, body, status, needle, param) -> None:
    kwargs = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = await raw(engine, "/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_api_key_required_when_configured(engine) -> None:
    body = {"model": "tiny", "prompt": "a"}
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        r = await raw(engine, "/v1/completions", json=body, headers=headers, api_key="secret")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = await raw(
        engine,
        "/v1/completions",
        json=body,
        headers={"Authorization": "Bearer secret"},
        api_key="secret",
    )
    assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await client_for(engine, api_key="secret").with_options(api_key="nope").models.list()


async def test_over_capacity_is_503_at_once(engine) -> None:
    engine.overloaded = True
    with pytest.raises(openai.InternalServerError) as err:
        await client_for(engine).completions.create(model="tiny", prompt="a")
    assert err.value.status_code == 503
    assert err.value.body["code"] == "overloaded"


async def test_over_capacity_says_when_to_retry(engine) -> None:
    engine.overloaded = True
    app = build_api(engine, IngressSettings(served_name="tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as h:
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert float(r.headers["openai-processing-ms"]) >= 0


async def test_an_engine_failure_is_a_500_in_openai_shape(engine) -> None:
    engine.broken = True
    app = build_api(engine, IngressSettings(served_name="tiny"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as h:
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "the device fell off the bus" in r.json()["error"]["message"]


async def test_health_needs_no_key(engine) -> None:
    app = build_api(engine, IngressSettings(served_name="tiny", api_key="k"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://x"
    ) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}


class RecordingMetrics:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.ttft: list[float] = []
        self.token_counts: list[tuple[int, int]] = []

    def request_done(self, route: str, status: int) -> None:
        self.requests.append((route, status))

    def first_token(self, seconds: float) -> None:
        self.ttft.append(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.token_counts.append((prompt, completion))


async def test_metrics_count_requests_tokens_and_first_token_of_streams(engine) -> None:
    metrics = RecordingMetrics()
    app = build_api(engine, IngressSettings(served_name="tiny"), metrics)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://x"
    ) as http:
        await http.post("/v1/completions", json={"model": "tiny", "prompt": "a b", "max_tokens": 3})
        await http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True},
        )
        await http.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    assert metrics.requests == [
        ("/v1/completions", 200),
        ("/v1/completions", 200),
        ("/v1/completions", 404),
    ]
    assert metrics.token_counts == [(2, 3), (1, 2)]
    assert len(metrics.ttft) == 1 and metrics.ttft[0] >= 0  # streams only: a plain request
    # has no first token apart from its whole answer
