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

from llmray_serve.engine import (
    Chunk,
    EngineOverloaded,
    EngineUnavailable,
    InvalidPrompt,
    SamplingParams,
    TokenLogprob,
)
from llmray_serve.ingress import IngressSettings, build_api

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


class FakeEngine:
    """Words are tokens; it answers the first words of WORDS (choice i from word i on),
    honouring max_tokens, stop, n and logprobs (word k of an answer: logprob -k/10). With
    `reply` set it answers that text instead, 3 characters a token."""

    tool_format = "hermes"

    def __init__(self) -> None:
        self.overloaded = False
        self.broken = False
        self.dead = False  # its generation loop stopped
        self.closed_early = 0
        self.seen: list[tuple[str, SamplingParams]] = []
        self.chats: list[tuple[list[dict], list[dict] | None]] = []
        self.reply: str | None = None

    def count_tokens(self, text: str) -> int:
        if not text.strip():
            raise InvalidPrompt("the prompt is empty (it has no tokens)")
        return len(text.split())

    def healthy(self) -> bool:
        return not self.dead

    def close(self) -> None:
        self.dead = True

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        self.chats.append((messages, tools))
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def answer(self, index: int) -> list[str]:
        if self.reply is not None:
            return [self.reply[i : i + 3] for i in range(0, len(self.reply), 3)]
        words = WORDS[index:] + WORDS[:index]
        return [(" " if k else "") + w for k, w in enumerate(words)]

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        if self.dead:
            raise EngineUnavailable("the generation loop has stopped")
        if self.overloaded:
            raise EngineOverloaded("2 requests ongoing, limit 2")
        if self.broken:
            raise RuntimeError("the device fell off the bus")
        self.seen.append((prompt, params))
        n_prompt = self.count_tokens(prompt)
        answers = [self.answer(i)[: params.max_tokens] for i in range(params.n)]
        done = [0] * params.n
        try:
            for step in range(max(len(a) for a in answers)):
                for index, answer in enumerate(answers):
                    if step >= len(answer) or done[index] < 0:
                        continue
                    if answer[step].strip() in params.stop:
                        done[index] = -1
                        yield Chunk("", n_prompt, step, "stop", index)
                        continue
                    done[index] += 1
                    await asyncio.sleep(0)
                    last = step == len(answer) - 1
                    full = len(self.answer(index))
                    finish = ("length" if params.max_tokens < full else "stop") if last else None
                    yield Chunk(
                        answer[step],
                        n_prompt,
                        step + 1,
                        finish,
                        index,
                        self._logprobs(answer[step], step, params.logprobs),
                        self._prompt_logprobs(prompt, params) if step == 0 else None,
                    )
        except GeneratorExit:
            self.closed_early += 1
            raise

    @staticmethod
    def _logprobs(token: str, k: int, top: int | None) -> tuple[TokenLogprob, ...]:
        if top is None:
            return ()
        others = tuple((f"alt{j}", -1.0 - j) for j in range(top))
        return (TokenLogprob(token, -k / 10, others),)

    @staticmethod
    def _prompt_logprobs(prompt: str, params: SamplingParams) -> tuple[TokenLogprob, ...] | None:
        if params.prompt_logprobs is None:
            return None
        words = prompt.split()
        return tuple(TokenLogprob(w, None if not i else -2.0) for i, w in enumerate(words))


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
        ({"model": "tiny", "prompt": "a", "n": 0}, 400, "n:", "n"),
        ({"model": "other", "prompt": "a"}, 404, "model 'other' does not exist", "model"),
        ({"model": "tiny", "prompt": ""}, 400, "the prompt is empty", "prompt"),
        (
            {"model": "tiny", "prompt": "a b c d e f g"},
            400,
            "7 tokens, more than this deployment's limit (generation.maxPromptTokens 5)",
            "prompt",
        ),
        ({"model": "tiny", "prompt": "a", "best_of": 2}, 400, "support best_of", "best_of"),
        ({"model": "tiny", "prompt": "a", "logprobs": 21}, 400, "logprobs:", "logprobs"),
        ({"model": "tiny", "prompt": "a", "seed": 2**63}, 400, "seed:", "seed"),
        ({"model": "tiny", "prompt": [1, 2]}, 400, "prompt", "prompt"),
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


async def test_an_engine_failure_is_a_500_in_openai_shape(engine, caplog) -> None:
    engine.broken = True
    app = build_api(engine, IngressSettings(served_name="tiny"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as h:
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error"
    request_id = r.headers["x-request-id"]
    assert f"request id {request_id}" in error["message"]
    assert "the device fell off the bus" not in error["message"]  # internals stay inside
    (record,) = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert "the device fell off the bus" in str(record.exc_info[1])  # ... in the log, by id


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


async def test_a_dead_engine_is_503_at_once_and_health_says_so(engine) -> None:
    engine.dead = True
    app = build_api(engine, IngressSettings(served_name="tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as h:
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
        health = await h.get("/health")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable"
    assert health.status_code == 503 and health.json() == {"status": "unhealthy"}


def test_the_replica_health_check_fails_with_the_engine() -> None:
    """Ray Serve calls check_health every HEALTH_CHECK_PERIOD_S; an exception marks it failed."""
    from types import SimpleNamespace

    from llmray_serve.app import LLMServer

    check_health = LLMServer.func_or_class.check_health  # of the class Ray runs
    replica = SimpleNamespace(engine=FakeEngine())  # without a model
    check_health(replica)
    replica.engine.dead = True
    with pytest.raises(RuntimeError, match="cannot generate"):
        check_health(replica)


async def test_the_key_is_checked_before_the_body_is_read() -> None:
    """An unauthenticated 10 MB body: 401 without one byte of it read (a plain ASGI
    middleware, before FastAPI parses anything)."""
    app = build_api(FakeEngine(), IngressSettings(served_name="tiny", api_key="k"))
    body = b'{"model": "tiny", "prompt": "' + b"x" * 10_000_000 + b'"}'
    reads, sent = 0, []

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 401 and reads == 0
    assert b"invalid_api_key" in sent[1]["body"]


async def test_metrics_label_the_route_template_not_the_path(engine) -> None:
    """1,000 invented paths add one series ("unmatched"), not 1,000."""
    import random
    import string

    metrics = RecordingMetrics()
    app = build_api(engine, IngressSettings(served_name="tiny", api_key="k"), metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as h:
        for _ in range(1000):
            name = "".join(random.choices(string.ascii_letters, k=12))
            await h.get(f"/v1/{name}", headers={"Authorization": "Bearer k"})
        await h.get("/nope")  # unauthenticated: 401, counted as well
        await h.get("/v1/models", headers={"Authorization": "Bearer k"})
    assert set(metrics.requests) == {("unmatched", 404), ("unmatched", 401), ("/v1/models", 200)}


def test_locally_the_api_key_stays_out_of_rays_runtime_env(monkeypatch, tmp_path) -> None:
    """A runtime_env is stored in Ray's GCS and shown by its dashboard: `llmray serve` leaves
    the key to the environment the local Ray's processes inherit."""
    from llmray.serve_args import ServeArgs
    from llmray_serve import local

    monkeypatch.setenv("LLMRAY_API_KEY", "s3cret")
    args = ServeArgs(
        name="t", model_uri=str(tmp_path), served_name="t", api_key_env="LLMRAY_API_KEY"
    )
    config = local.serve_config(args)  # what `llmray serve` deploys, as Ray would store it
    assert "s3cret" not in repr(config)
    (app,) = config["applications"]
    assert app["runtime_env"]["env_vars"].keys() == {"OMP_NUM_THREADS"}


NOT_IMPLEMENTED = [  # (parameter, a value that asks for it)
    ("functions", [{"name": "f"}]),
    ("function_call", {"name": "f"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("store", True),
    ("reasoning_effort", "high"),
    ("prediction", {"type": "content", "content": "x"}),
]


@pytest.mark.parametrize(("param", "value"), NOT_IMPLEMENTED)
async def test_a_parameter_not_implemented_is_a_400_naming_it(engine, param, value) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], param: value}
    r = await raw(engine, "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert f"does not support {param}" in r.json()["error"]["message"]


async def test_parameters_that_ask_for_nothing_are_accepted(engine) -> None:
    """What SDKs and frameworks send by default, and labels that change nothing."""
    neutral = {
        "logprobs": False,
        "top_logprobs": 0,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "functions": [],
        "store": False,
        "stream": None,
        "user": "u-1",
        "metadata": {"team": "a"},
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "seed": -(2**63),
    }
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], **neutral}
    r = await raw(engine, "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


async def test_max_tokens_above_the_limit_is_clamped(engine) -> None:
    client = client_for(engine)  # maxNewTokens 16
    done = await client.completions.create(model="tiny", prompt="a", max_tokens=10_000)
    assert engine.seen[-1][1].max_tokens == 16
    assert done.choices[0].finish_reason == "stop"  # (the fake's answer has 9 words)
    chat = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a"}], max_completion_tokens=99
    )
    assert engine.seen[-1][1].max_tokens == 16 and chat.choices[0].message.content


async def test_max_tokens_0_and_top_p_0(engine) -> None:
    client = client_for(engine)
    none = await client.completions.create(model="tiny", prompt="a", max_tokens=0)
    assert (none.choices[0].text, none.choices[0].finish_reason) == ("", "length")
    assert none.usage.completion_tokens == 0 and not engine.seen  # the engine was not asked
    await client.completions.create(model="tiny", prompt="a", top_p=0, temperature=1)
    assert engine.seen[-1][1].temperature == 0  # the top token only: greedy


async def test_models_by_id_and_unknown_routes_in_openai_shape(engine) -> None:
    client = client_for(engine)
    assert (await client.models.retrieve("tiny")).id == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("other")
    assert err.value.body["code"] == "model_not_found"
    app = build_api(engine, IngressSettings(served_name="tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as h:
        missing = await h.get("/v1/nope")
        wrong = await h.delete("/v1/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}
