"""The OpenAI routes of a deployment with adapters (fake engine, in-process, `openai`
client): /v1/models lists the base and its ready adapters, a request's `model` picks the
adapter, unknown and not-ready names are OpenAI-shaped 404s."""

from __future__ import annotations

import httpx
import openai
import pytest

from llmray.serve_args import AdapterArgs, ServeUserConfig
from llmray_serve.adapter_registry import AdapterRegistry
from llmray_serve.ingress import IngressSettings, build_api
from tests.test_serve_routes import FakeEngine


class AdapterFakeEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, str] = {}

    async def load_adapter(self, name: str, path: str) -> None:
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        del self.loaded[name]


ADAPTERS = ServeUserConfig(
    adapters=[
        AdapterArgs(name="legal", uri="/adapters/legal"),
        AdapterArgs(
            name="next-week",
            reason="FineTuneJobRunning",
            message="FineTuneJob next-week is Running: the adapter is served once it succeeded",
        ),
    ]
)


@pytest.fixture
async def served():
    engine = AdapterFakeEngine()
    adapters = AdapterRegistry(engine, "tiny", 2, fetch=lambda uri: uri)
    adapters.update(ADAPTERS)
    app = build_api(engine, IngressSettings(served_name="tiny"), adapters=adapters)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llmray")
    client = openai.AsyncOpenAI(
        base_url="http://llmray/v1", api_key="x", http_client=http, max_retries=0
    )
    yield engine, adapters, client
    await http.aclose()


async def test_models_lists_the_base_and_each_ready_adapter_with_its_parent(served) -> None:
    _, adapters, client = served
    models = {m.id: m for m in (await client.models.list()).data}
    assert list(models) == ["tiny", "legal"]  # next-week is not ready: not listed
    assert models["legal"].model_extra["parent"] == "tiny"
    assert (await client.models.retrieve("legal")).id == "legal"
    adapters.update(ServeUserConfig(adapters=[]))  # a live change: listed no more
    assert [m.id for m in (await client.models.list()).data] == ["tiny"]


async def test_a_requests_model_picks_its_adapter_and_the_base_stays_the_base(served) -> None:
    engine, _, client = served
    await client.completions.create(model="legal", prompt="Hi there", max_tokens=2)
    await client.completions.create(model="tiny", prompt="Hi there", max_tokens=2)
    stream = await client.chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
    )
    async for _ in stream:
        pass
    (key,) = engine.loaded  # loaded once, under the registry's key
    assert engine.loaded[key] == "/adapters/legal"
    assert [params.adapter for _, params in engine.seen] == [key, None, key]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nope", "model 'nope' does not exist; this server serves 'tiny', 'legal'"),
        (
            "next-week",
            "adapter 'next-week' is not ready: FineTuneJob next-week is Running: the adapter "
            "is served once it succeeded (FineTuneJobRunning)",
        ),
    ],
)
async def test_unknown_and_not_ready_names_are_404s_saying_why(served, model, message) -> None:
    engine, _, client = served
    for call in (
        lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2),
        lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}]
        ),
        lambda: client.models.retrieve(model),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            await call()
        assert err.value.body == {
            "message": message,
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    assert not engine.seen and not engine.loaded
