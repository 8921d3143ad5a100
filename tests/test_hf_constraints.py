"""The transformers engine's per-request logits work on the tiny model (no Ray, no HTTP):
grammar-constrained output, logprobs against the model itself, n choices, logit_bias,
penalties, the prompt's logprobs, and requests that ask for them batched with ones that
do not."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import jsonschema
import pytest

from llmray_serve.chat_tools import plan_chat
from llmray_serve.engine import InvalidParameter, SamplingParams, collect
from llmray_serve.protocol import ChatCompletionRequest
from llmray_serve.tool_parsers import Call, parser

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, top_p=1.0)
HOT = SamplingParams(max_tokens=12, temperature=1.0, top_p=1.0)
# Every value bounded (enum, range, length): any sample of the grammar fits in max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "rain": {"type": "boolean"},
        "degrees": {"type": "integer", "minimum": -30, "maximum": 45},
        "sky": {"enum": ["clear", "cloudy"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["city", "rain", "degrees", "sky", "tags"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def engine(tiny_model):
    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, max_batch=8, max_ongoing=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def tolerance(engine) -> float:
    """Relative: the engine runs bf16 where the CPU has native bf16 (hf_model.resolve), ~3
    significant digits; the reference model always fp32."""
    import torch

    return 2e-2 if engine.model.dtype == torch.bfloat16 else 1e-3


def loglikelihood(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt) computed with the model directly (one forward pass)."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(
        float(logprobs[len(prompt_ids) + i - 1, token]) for i, token in enumerate(completion_ids)
    )


def plan(engine, **body):
    request = ChatCompletionRequest.model_validate(
        {"model": "t", "messages": [{"role": "user", "content": "Weather?"}], **body}
    )
    return plan_chat(request, engine.tool_format)


def schema_grammar(engine) -> str:
    """The grammar of a strict json_schema response_format for SCHEMA."""
    return plan(
        engine,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
        },
    ).grammar


async def test_json_schema_output_validates_for_50_samples_at_temperature_1(engine) -> None:
    grammar = schema_grammar(engine)
    prompt = engine.render_chat([{"role": "user", "content": "The weather as JSON"}])
    params = replace(HOT, max_tokens=96, grammar=grammar)
    ongoing = asyncio.Semaphore(engine.max_ongoing)  # beyond it the engine answers 503

    async def one():
        async with ongoing:
            return await collect(engine.generate(prompt, params))

    outs = await asyncio.gather(*(one() for _ in range(50)))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        jsonschema.validate(value, SCHEMA)
        assert set(value) == set(SCHEMA["properties"])  # closed: no key the schema lacks
    assert len({o.text for o in outs}) > 10  # sampled, not one answer forced


async def test_json_object_output_is_an_object(engine) -> None:
    grammar = plan(engine, response_format={"type": "json_object"}).grammar
    prompt = engine.render_chat([{"role": "user", "content": "JSON please"}])
    out = await collect(engine.generate(prompt, replace(GREEDY, max_tokens=64, grammar=grammar)))
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:  # cut by max_tokens: still the start of an object
        assert out.text.startswith("{")


async def test_required_and_named_tool_choices_always_give_a_valid_call(engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Weather in Paris?"}], [WEATHER, TIME])
    hermes = parser(engine.tool_format)
    required = {"tool_choice": "required", "parallel_tool_calls": False}
    named = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    # (one call each: a random model asked for many chains calls up to max_tokens)
    for body, names in ((required, {"get_weather", "get_time"}), (named, {"get_weather"})):
        grammar = plan(engine, tools=[WEATHER, TIME], **body).grammar
        params = replace(HOT, max_tokens=80, grammar=grammar, n=4)
        out = await collect(engine.generate(prompt, params))
        for choice in out.choices.values():
            stream = hermes.stream({"get_weather", "get_time"})
            events = stream.feed(choice.text) + stream.finish()
            calls = [e for e in events if isinstance(e, Call)]
            assert calls and all(isinstance(e, Call) for e in events), choice.text
            assert {c.name for c in calls} <= names
            for call in calls:
                if call.name == "get_weather":
                    jsonschema.validate(
                        json.loads(call.arguments), WEATHER["function"]["parameters"]
                    )


async def test_logprobs_sum_to_the_sequence_loglikelihood_of_the_model(engine, model) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Tell me about Ray"}])
    prompt_ids = engine.prompt_ids(prompt)
    for params in (replace(GREEDY, logprobs=3), replace(HOT, logprobs=0, seed=1)):
        out = await collect(engine.generate(prompt, params))
        tokens = out.choices[0].logprobs
        assert tokens and "".join(t.token for t in tokens) == out.text
        ids = [t.id for t in tokens]
        expected = loglikelihood(model, prompt_ids, ids)
        assert sum(t.logprob for t in tokens) == pytest.approx(expected, rel=tolerance(engine))
        if params.temperature == 0:  # greedy: the chosen token is the most likely one
            assert all(t.top[0] == (t.token, pytest.approx(t.logprob)) for t in tokens)
            assert all(len(t.top) == 3 for t in tokens)


async def test_the_prompts_logprobs_are_the_models(engine, model) -> None:
    prompt = "Once upon a time there was a"
    ids = engine.prompt_ids(prompt)
    out = await collect(engine.generate(prompt, replace(GREEDY, max_tokens=1, prompt_logprobs=2)))
    scored = out.choices[0].prompt_logprobs
    assert [t.id for t in scored] == ids and scored[0].logprob is None
    for k in range(1, len(ids)):
        expected = loglikelihood(model, ids[:k], [ids[k]])
        assert scored[k].logprob == pytest.approx(expected, rel=tolerance(engine))
        assert len(scored[k].top) == 2


async def test_n_choices_are_sampled_apart_from_one_prompt(engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Write something"}])
    out = await collect(engine.generate(prompt, replace(HOT, n=3)))
    assert sorted(out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices.values()}) == 3
    assert out.usage.completion_tokens == sum(c.completion_tokens for c in out.choices.values())
    greedy = await collect(engine.generate(prompt, replace(GREEDY, n=3)))
    alone = await collect(engine.generate(prompt, GREEDY))
    assert {c.text for c in greedy.choices.values()} == {alone.text}
    streamed = [c async for c in engine.generate(prompt, replace(HOT, n=2, max_tokens=5))]
    assert {c.index for c in streamed} == {0, 1}
    assert sum(1 for c in streamed if c.finish_reason) == 2
    with pytest.raises(InvalidParameter, match="at most 16 choices"):
        await anext(engine.generate(prompt, replace(GREEDY, n=17)))
    assert engine._ongoing == 0


async def test_logit_bias_bans_and_forces_tokens(engine) -> None:
    prompt = "Once upon a time"
    free = await collect(engine.generate(prompt, replace(GREEDY, logprobs=0)))
    first = free.choices[0].logprobs[0].id
    banned = await collect(
        engine.generate(prompt, replace(GREEDY, logprobs=0, logit_bias=((first, -100.0),)))
    )
    assert banned.choices[0].logprobs[0].id != first
    forced_id = engine.tokenizer.convert_tokens_to_ids("Ġcat")  # a word the model rarely says
    forced = await collect(
        engine.generate(prompt, replace(GREEDY, logprobs=0, logit_bias=((forced_id, 100.0),)))
    )
    assert {t.id for t in forced.choices[0].logprobs} == {forced_id}
    with pytest.raises(InvalidParameter, match="not in this model's vocabulary"):
        await anext(engine.generate(prompt, replace(GREEDY, logit_bias=((10**6, 1.0),))))


async def test_penalties_make_greedy_text_repeat_less(engine) -> None:
    prompt = "The the the"
    base = replace(GREEDY, max_tokens=40, logprobs=0)
    plain = await collect(engine.generate(prompt, base))
    penalised = await collect(
        engine.generate(prompt, replace(base, presence_penalty=2.0, frequency_penalty=2.0))
    )

    def distinct(out) -> int:
        return len({t.id for t in out.choices[0].logprobs})

    assert distinct(penalised) > distinct(plain)
    rewarded = await collect(engine.generate(prompt, replace(base, frequency_penalty=-2.0)))
    assert distinct(rewarded) <= distinct(plain)


async def test_constrained_requests_leave_the_others_in_their_batch_alone(engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Tell me about the sea"}])
    alone = await collect(engine.generate(prompt, GREEDY))
    grammar = plan(engine, response_format={"type": "json_object"}).grammar
    constrained = replace(HOT, max_tokens=30, grammar=grammar, logit_bias=((5, 3.0),), logprobs=2)
    together = await asyncio.gather(
        collect(engine.generate(prompt, GREEDY)),
        *(collect(engine.generate(prompt, constrained)) for _ in range(4)),
        collect(engine.generate(prompt, GREEDY)),
    )
    assert together[0].text == together[-1].text == alone.text
    assert all(o.text.startswith("{") for o in together[1:-1])
    assert not engine.logits.controls  # every request's controls are gone with it


async def test_a_batch_of_different_grammars_gives_each_request_its_own(engine) -> None:
    schema = schema_grammar(engine)
    calls = plan(engine, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    prompt = engine.render_chat([{"role": "user", "content": "The weather"}])
    answers = replace(HOT, max_tokens=96, grammar=schema)
    call = replace(HOT, max_tokens=80, grammar=calls.grammar)
    outs = await asyncio.gather(
        *(collect(engine.generate(prompt, answers if i % 2 else call)) for i in range(8))
    )
    for i, out in enumerate(outs):
        if i % 2:
            jsonschema.validate(json.loads(out.text), SCHEMA)
            continue
        stream = calls.parser.stream({"get_weather"})
        (event,) = stream.feed(out.text) + stream.finish()
        assert isinstance(event, Call), out.text
        jsonschema.validate(json.loads(event.arguments), WEATHER["function"]["parameters"])
