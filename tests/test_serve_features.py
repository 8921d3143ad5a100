"""Tool calls, structured output, logprobs, echo, n, penalties and logit_bias through the
ingress, with the fake engine of test_serve_routes (the official `openai` client in-process;
every response validated against OpenAI's published schemas). The engines honour them in
test_hf_constraints.py, test_vllm_engine.py and over real HTTP in test_serve_tools.py."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from llmray_serve.ingress import IngressSettings, build_api
from tests.openai_schema import validate
from tests.test_serve_routes import FakeEngine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def client_for(engine: FakeEngine) -> openai.AsyncOpenAI:
    app = build_api(engine, IngressSettings(served_name="tiny", max_new_tokens=64))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llmray")
    return openai.AsyncOpenAI(
        base_url="http://llmray/v1", api_key="x", http_client=http, max_retries=0
    )


async def raw_chat(engine: FakeEngine, **body) -> httpx.Response:
    app = build_api(engine, IngressSettings(served_name="tiny", max_new_tokens=64))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as h:
        return await h.post("/v1/chat/completions", json={"model": "tiny", **body})


def sse_events(response: httpx.Response) -> list[dict]:
    data = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_a_tool_call_in_the_answer_becomes_tool_calls(engine) -> None:
    engine.reply = "Let me check." + CALL_TEXT
    done = await client_for(engine).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, TIME]
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The tools reached the chat template as OpenAI sent them; auto: free text, in which an
    # opened call must be a valid one.
    assert engine.chats[-1][1] == [WEATHER, TIME]
    grammar = engine.seen[-1][1].grammar
    assert 'call_open[lazy]: TEXT "<tool_call>"' in grammar and '"const":"get_time"' in grammar
    validate(done.model_dump(exclude_unset=True), "CreateChatCompletionResponse")


async def test_streamed_tool_calls_are_deltas_that_add_up_to_the_same_call(engine) -> None:
    engine.reply = CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Oslo")
    response = await raw_chat(engine, messages=ASK, tools=[WEATHER], stream=True)
    chunks = sse_events(response)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    # OpenAI's order: each call's id, type and name first (empty arguments), then arguments.
    assert [c["index"] for c in calls] == [0, 0, 1, 1]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"]
    assert "id" not in calls[1] and json.loads(calls[1]["function"]["arguments"]) == {
        "city": "Paris"
    }
    assert json.loads(calls[3]["function"]["arguments"]) == {"city": "Oslo"}
    assert not any(d.get("content") for d in deltas)  # the format's text is not content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The openai client's own accumulation gives the same calls as the plain response.
    stream = await client_for(engine).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], stream=True
    )
    arguments: dict[int, str] = {}
    async for chunk in stream:
        for c in chunk.choices[0].delta.tool_calls or []:
            arguments[c.index] = arguments.get(c.index, "") + (c.function.arguments or "")
    plain = await client_for(engine).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER]
    )
    assert [c.function.arguments for c in plain.choices[0].message.tool_calls] == [
        arguments[0],
        arguments[1],
    ]


async def test_text_that_is_not_a_valid_call_stays_text(engine) -> None:
    client = client_for(engine)
    for reply in ("<tool_call>\nnot json\n</tool_call>", CALL_TEXT.replace("get_weather", "rm")):
        engine.reply = reply
        done = await client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
        assert done.choices[0].message.content == reply and not done.choices[0].message.tool_calls
        assert done.choices[0].finish_reason == "stop"
    engine.reply = CALL_TEXT  # tool_choice none: the model's text, never parsed
    done = await client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none"
    )
    assert done.choices[0].message.content == CALL_TEXT


async def test_required_and_named_choices_are_enforced_by_a_grammar(engine) -> None:
    client = client_for(engine)
    engine.reply = CALL_TEXT
    await client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required"
    )
    grammar = engine.seen[-1][1].grammar
    assert grammar.startswith("start: calls\n") and 'call ("\\n" call)*' in grammar
    assert '"const":"get_weather"' in grammar and '"const":"get_time"' in grammar
    await client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    named = engine.seen[-1][1].grammar
    assert '"const":"get_time"' in named and "get_weather" not in named
    assert "calls: call\n" in named  # exactly one call
    await client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert "calls: call\n" in engine.seen[-1][1].grammar
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [TIME]}}
    await client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=allowed
    )
    assert "get_weather" not in engine.seen[-1][1].grammar


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "'x', which is not in tools (get_weather)",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0", "function tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
            "Invalid type: nonsense",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"1": 101}}, "logit_bias", "between -100 and 100"),
        ({"presence_penalty": 2.5}, "presence_penalty", ""),
        ({"messages": [{"role": "tool", "content": None}]}, "messages.0", "needs content"),
    ],
)
async def test_what_cannot_be_done_is_a_400_naming_the_field(engine, body, param, needle) -> None:
    r = await raw_chat(engine, **{"messages": ASK, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"]
    validate(r.json(), "ErrorResponse")


async def test_a_conversation_with_tool_calls_and_results_reaches_the_template(engine) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
    ]
    done = await client_for(engine).chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER]
    )
    assert done.choices[0].message.content
    messages, _ = engine.chats[-1]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[2] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}


async def test_response_format_json_schema_and_json_object_become_grammars(engine) -> None:
    client = client_for(engine)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    await client.chat.completions.create(
        model="tiny",
        messages=ASK,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    grammar = engine.seen[-1][1].grammar
    assert grammar.startswith("start: answer\nanswer: %json")
    # Closed objects and compact separators (grammars.py), the caller's schema untouched.
    assert '"additionalProperties":false' in grammar and '"whitespace_flexible":false' in grammar
    assert "additionalProperties" not in schema
    await client.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}
    )
    assert '%json{"type":"object"' in engine.seen[-1][1].grammar
    # With tools left to the model: either the answer in that format, or calls.
    await client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], response_format={"type": "json_object"}
    )
    assert engine.seen[-1][1].grammar.startswith("start: either\neither: answer | calls\n")


async def test_n_choices_whole_and_streamed(engine) -> None:
    client = client_for(engine)
    done = await client.chat.completions.create(model="tiny", messages=ASK, n=3, max_tokens=4)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert len({c.message.content for c in done.choices}) == 3
    assert done.usage.completion_tokens == 12  # summed over the choices
    assert engine.seen[-1][1].n == 3
    validate(done.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    r = await raw_chat(engine, messages=ASK, n=3, max_tokens=4, stream=True)
    texts: dict[int, str] = {}
    for chunk in sse_events(r):
        validate(chunk, "CreateChatCompletionStreamResponse")
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + (
            choice["delta"].get("content") or ""
        )
    assert [texts[i] for i in range(3)] == [c.message.content for c in done.choices]
    completions = await client.completions.create(model="tiny", prompt="a", n=2, max_tokens=2)
    assert [c.text for c in completions.choices] == ["the quick", "quick brown"]


async def test_chat_logprobs_and_top_logprobs(engine) -> None:
    done = await client_for(engine).chat.completions.create(
        model="tiny", messages=ASK, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = done.choices[0].logprobs.content
    assert [t.token for t in content] == ["the", " quick", " brown"]
    assert [t.logprob for t in content] == [0.0, -0.1, -0.2]
    assert [a.token for a in content[0].top_logprobs] == ["alt0", "alt1"]
    assert content[1].bytes == list(b" quick")
    assert engine.seen[-1][1].logprobs == 2
    validate(done.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    r = await raw_chat(engine, messages=ASK, max_tokens=3, logprobs=True, stream=True)
    streamed = [
        t for c in sse_events(r) for t in (c["choices"][0]["logprobs"] or {}).get("content", [])
    ]
    assert [t["token"] for t in streamed] == ["the", " quick", " brown"]
    assert all(t["top_logprobs"] == [] for t in streamed)  # top_logprobs 0


async def test_completion_logprobs_echo_and_text_offsets(engine) -> None:
    client = client_for(engine)
    done = await client.completions.create(model="tiny", prompt="say it", max_tokens=2, logprobs=1)
    lp = done.choices[0].logprobs
    assert lp.tokens == ["the", " quick"] and lp.token_logprobs == [0.0, -0.1]
    assert lp.text_offset == [0, 3]
    assert lp.top_logprobs[1] == {"alt0": -1.0, " quick": -0.1}  # with the chosen token
    echoed = await client.completions.create(
        model="tiny", prompt="say it", max_tokens=2, logprobs=0, echo=True
    )
    choice = echoed.choices[0]
    assert choice.text == "say itthe quick"
    assert choice.logprobs.tokens == ["say", "it", "the", " quick"]
    assert choice.logprobs.token_logprobs[:2] == [None, -2.0]  # nothing predicts the first
    assert engine.seen[-1][1].prompt_logprobs == 0
    # echo with max_tokens 0: the prompt scored, nothing generated (lm-eval's loglikelihood).
    scored = await client.completions.create(
        model="tiny", prompt="say it", max_tokens=0, logprobs=1, echo=True
    )
    assert scored.choices[0].text == "say it" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.tokens == ["say", "it"]
    assert scored.choices[0].finish_reason == "length"
    plain_echo = await client.completions.create(
        model="tiny", prompt="say it", max_tokens=1, echo=True
    )
    assert plain_echo.choices[0].text == "say itthe" and plain_echo.choices[0].logprobs is None


async def test_penalties_and_logit_bias_reach_the_engine(engine) -> None:
    await client_for(engine).chat.completions.create(
        model="tiny",
        messages=ASK,
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        logit_bias={"7": -100, "12": 3},
    )
    params = engine.seen[-1][1]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.5)
    assert params.logit_bias == ((7, -100.0), (12, 3.0))
