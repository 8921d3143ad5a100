"""Agent frameworks against `llmray serve`: a tiny model fine-tuned here (`llmray finetune`,
the `chat` format with tool calls) to call a weather tool and then answer from its result,
served on a real local Ray Serve over real HTTP, driven by the official `openai` client,
LangChain's ChatOpenAI (bind_tools, with_structured_output) and LiteLLM; every response
validated against OpenAI's published schemas.

Constrained decoding makes the calls' shape certain (a call, once the model opens it, can
only be a valid call of an offered function); the fine-tune makes the choice sensible (a
weather question gets a call, a tool result gets an answer).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import jsonschema
import openai
import pytest
import yaml
from pydantic import BaseModel, Field

from tests.openai_schema import validate

pytestmark = pytest.mark.integration

CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Madrid", "Nairobi"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER, TIME]
GREETING = "I am a weather assistant: ask me about the weather in a city."


def tool_chats(n: int) -> list[dict]:
    """Weather questions answered by a get_weather call, then from its result; a greeting
    now and then, answered in text."""
    records = []
    for i in range(n):
        city, degrees = CITIES[i % len(CITIES)], 5 + (7 * i) % 30
        if i % 4 == 3:
            messages = [
                {"role": "user", "content": "Hello, who are you?"},
                {"role": "assistant", "content": GREETING},
            ]
        else:
            call = {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
            }
            result = json.dumps({"city": city, "degrees": degrees})
            messages = [
                {"role": "user", "content": f"What is the weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": result},
                {"role": "assistant", "content": f"It is {degrees} degrees in {city}."},
            ]
        records.append({"messages": messages, "tools": TOOLS})
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tool_model(ray_session, tiny_model, tmp_path_factory) -> str:
    """`llmray finetune` of the tiny model on tool-calling chats (one worker, ~100 steps)."""
    from llmray_trainer.local import finetune_file

    folder = tmp_path_factory.mktemp("tools")
    data = folder / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tool_chats(64)))
    job = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "weather-tools"},
        "spec": {
            "baseModel": {"uri": str(tiny_model)},
            "dataset": {"train": str(data), "format": "chat", "maxSeqLength": 1024},
            "hyperparameters": {
                "maxSteps": 120,
                "learningRate": 4e-3,
                "batchSizePerWorker": 8,
                "warmupRatio": 0.05,
                "lrScheduler": "cosine",
                "seed": 3,
                "precision": "fp32",
            },
            "compute": {"workers": 1},
            "checkpointing": {"everyEpoch": False},
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = finetune_file(path)
    losses = [s["trainLoss"] for s in result.steps]
    assert losses[-1] < losses[0] * 0.3, losses
    return result.model_uri


@pytest.fixture(scope="module")
def server(tool_model):
    from ray import serve

    from llmray.serve_args import ServeArgs
    from llmray_serve.local import start

    base = start(
        ServeArgs(
            name="weather",
            model_uri=tool_model,
            served_name="weather",
            max_new_tokens=96,
            max_prompt_tokens=1024,
            num_cpus=0,
        ),
        free_port(),
    )
    yield base
    serve.shutdown()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def ask(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def check(response, schema: str = "CreateChatCompletionResponse") -> None:
    validate(response.model_dump(exclude_unset=True), schema)


def test_a_tool_call_round_trip_with_the_openai_client(client) -> None:
    first = client.chat.completions.create(
        model="weather", messages=ask("Oslo"), tools=TOOLS, temperature=0
    )
    check(first)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # The caller runs the tool and sends the call and its result back.
    history = [
        *ask("Oslo"),
        choice.message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"city": arguments["city"], "degrees": 21}),
        },
    ]
    second = client.chat.completions.create(
        model="weather", messages=history, tools=TOOLS, temperature=0
    )
    check(second)
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "degrees" in answer.message.content
    # A greeting is answered, not a call.
    hello = client.chat.completions.create(
        model="weather",
        messages=[{"role": "user", "content": "Hello, who are you?"}],
        tools=TOOLS,
        temperature=0,
    )
    assert (
        hello.choices[0].finish_reason == "stop" and "weather" in hello.choices[0].message.content
    )


def test_streamed_tool_calls_add_up_to_the_plain_ones(client) -> None:
    plain = client.chat.completions.create(
        model="weather", messages=ask("Rome"), tools=TOOLS, temperature=0
    )
    stream = client.chat.completions.create(
        model="weather", messages=ask("Rome"), tools=TOOLS, temperature=0, stream=True
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        check(chunk, "CreateChatCompletionStreamResponse")
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in plain.choices[0].message.tool_calls
    ]


def test_a_named_tool_choice_forces_that_call(client) -> None:
    """get_time was never called in training; naming it forces it anyway."""
    done = client.chat.completions.create(
        model="weather",
        messages=ask("Lima"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=1.0,
        n=3,
    )
    check(done)
    assert len(done.choices) == 3
    for choice in done.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


class Forecast(BaseModel):
    city: str = Field(json_schema_extra={"enum": CITIES})
    degrees: int = Field(ge=-40, le=50)
    rain: bool


def test_structured_output_with_the_sdks_parse(client) -> None:
    for temperature in (0.0, 1.0):
        raw = client.chat.completions.with_raw_response.parse(
            model="weather",
            messages=ask("Cairo"),
            response_format=Forecast,
            temperature=temperature,
            n=2,
        )
        validate(raw.http_response.json(), "CreateChatCompletionResponse")  # as sent
        for choice in raw.parse().choices:
            assert isinstance(choice.message.parsed, Forecast), choice.message.content


def test_langchain_bind_tools_and_with_structured_output(server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="weather", base_url=server, api_key="unused", temperature=0)
    with_tools = chat.bind_tools(TOOLS)
    question = HumanMessage("What is the weather in Paris?")
    reply = with_tools.invoke([question])
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in CITIES
    result = ToolMessage(
        json.dumps({"city": call["args"]["city"], "degrees": 12}), tool_call_id=call["id"]
    )
    answer = with_tools.invoke([question, reply, result])
    assert not answer.tool_calls and "degrees" in answer.content
    forced = chat.bind_tools(TOOLS, tool_choice="get_time").invoke([question])
    assert [c["name"] for c in forced.tool_calls] == ["get_time"]
    for method in ("json_schema", "function_calling", "json_mode"):
        structured = chat.with_structured_output(Forecast, method=method)
        prompt = [question] if method != "json_mode" else [HumanMessage("Paris weather as JSON")]
        if method == "json_mode":  # any JSON object: parsed, not necessarily a Forecast
            raw = chat.with_structured_output(None, method="json_mode").invoke(prompt)
            assert isinstance(raw, dict)
            continue
        assert isinstance(structured.invoke(prompt), Forecast)


def test_litellm_tool_call_and_json(server, monkeypatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price list download
    import litellm

    kwargs = {"model": "openai/weather", "api_base": server, "api_key": "unused", "temperature": 0}
    done = litellm.completion(messages=ask("Tokyo"), tools=TOOLS, **kwargs)
    (call,) = done.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert done.choices[0].finish_reason == "tool_calls"
    forecast = litellm.completion(messages=ask("Tokyo"), response_format=Forecast, **kwargs)
    Forecast.model_validate_json(forecast.choices[0].message.content)


def test_logprobs_n_and_echo_over_http(client, server, tool_model) -> None:
    done = client.chat.completions.create(
        model="weather",
        messages=ask("Madrid"),
        n=3,
        temperature=1.0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    check(done)
    assert [c.index for c in done.choices] == [0, 1, 2]
    for choice in done.choices:
        tokens = choice.logprobs.content
        assert tokens and all(len(t.top_logprobs) == 2 for t in tokens)
        assert "".join(t.token for t in tokens) == (choice.message.content or "")
    scored = client.completions.create(
        model="weather", prompt="What is the weather", max_tokens=0, echo=True, logprobs=1
    )
    validate_completion = scored.model_dump(exclude_unset=True)
    # OpenAI's schema says number where OpenAI itself sends null: the first prompt token.
    assert validate_completion["choices"][0]["logprobs"]["token_logprobs"][0] is None
    validate_completion["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    validate_completion["choices"][0]["logprobs"]["top_logprobs"][0] = {}
    validate(validate_completion, "CreateCompletionResponse")
    assert scored.choices[0].text == "What is the weather"
    assert all(lp < 0 for lp in scored.choices[0].logprobs.token_logprobs[1:])


def test_the_fine_tuned_tokenizer_kept_the_template_with_tools(tool_model) -> None:
    from transformers import AutoTokenizer

    from llmray.chat import DEFAULT_CHAT_TEMPLATE

    assert AutoTokenizer.from_pretrained(Path(tool_model)).chat_template == DEFAULT_CHAT_TEMPLATE
