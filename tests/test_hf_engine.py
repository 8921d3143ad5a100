"""The transformers engine on the tiny model: batching, limits, stop, cancel (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from llmray_serve.engine import EngineOverloaded, EngineUnavailable, SamplingParams, collect

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, max_batch=8, max_ongoing=10)
    yield engine
    engine.close()
    assert not engine.healthy()


async def test_greedy_is_deterministic_and_counts_tokens(engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "What is Ray?"}])
    first = await collect(engine.generate(prompt, GREEDY))
    again = await collect(engine.generate(prompt, GREEDY))
    assert first.text == again.text and first.text
    assert first.usage.prompt_tokens == engine.count_tokens(prompt)
    assert 0 < first.usage.completion_tokens <= 12
    assert first.finish_reason in ("length", "stop")


async def test_concurrent_requests_share_forward_passes(engine) -> None:
    passes = engine.forward_passes
    prompt = "Tell me about the sea"
    results = await asyncio.gather(*(collect(engine.generate(prompt, GREEDY)) for _ in range(8)))
    assert len({r.text for r in results}) == 1  # same prompt, greedy: same answer in a batch
    tokens = sum(r.usage.completion_tokens for r in results)
    assert tokens > 8
    # One pass per token if they queued one by one; batched, a pass serves many requests.
    assert engine.forward_passes - passes <= tokens / 3


def _greedy_without_cache(engine, prompt: str, max_tokens: int) -> str:
    """The greedy answer by the model itself, every token from the whole sequence: no KV
    cache, nothing shared."""
    import torch

    ids = engine.prompt_ids(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = engine.model(torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token in engine.eos_ids:
                break
            new.append(token)
    return engine.tokenizer.decode(new, skip_special_tokens=True)


async def test_requests_starting_with_the_same_long_prompt_run_it_once(engine) -> None:
    # A system prompt (or a tools section) several KV cache blocks long, then a question.
    system = "You answer questions about rivers, seas and the weather. " * 12
    prompts = [f"{system}Question {i}: where does the river go?" for i in range(6)]
    lengths = [engine.count_tokens(p) for p in prompts]
    assert min(lengths) > 4 * 32  # several blocks
    await collect(engine.generate(prompts[0], GREEDY))  # its blocks are cached now
    tokens = engine.forward_tokens
    results = await asyncio.gather(*(collect(engine.generate(p, GREEDY)) for p in prompts[1:]))
    ran = engine.forward_tokens - tokens
    generated = sum(r.usage.completion_tokens for r in results)
    # Each prompt ran only past the blocks it shares with the first: far less than whole.
    assert ran - generated < sum(lengths[1:]) / 3
    # And the answers are those of the model run without any cache.
    for prompt, result in zip(prompts[1:], results, strict=True):
        assert result.text == _greedy_without_cache(engine, prompt, GREEDY.max_tokens)


async def test_a_late_request_joins_the_running_batch(engine) -> None:
    long = SamplingParams(max_tokens=40, temperature=1.0, top_p=1.0)
    first = engine.generate("Once upon a time", long)
    await anext(first)  # decoding has started
    short = await collect(engine.generate("Hi", SamplingParams(2, 0.0, 1.0)))
    assert short.usage.completion_tokens <= 2
    # The short request finished while the long one was still decoding: it did not wait.
    rest = [c async for c in first]
    assert rest and rest[-1].finish_reason


async def test_max_tokens_and_stop(engine) -> None:
    long = SamplingParams(max_tokens=5, temperature=0.0, top_p=1.0)
    out = await collect(engine.generate("Once upon a time", long))
    assert out.usage.completion_tokens <= 5
    full = await collect(engine.generate("Once upon a time", GREEDY))
    word = full.text.split()[1] if len(full.text.split()) > 1 else None
    if word:  # stop on a later word: the text ends before it
        cut = await collect(
            engine.generate("Once upon a time", SamplingParams(12, 0.0, 1.0, stop=(word,)))
        )
        assert word not in cut.text and cut.finish_reason == "stop"
        assert full.text.startswith(cut.text)


async def test_sampling_varies_with_temperature(engine) -> None:
    hot = SamplingParams(max_tokens=12, temperature=1.5, top_p=1.0)
    texts = {(await collect(engine.generate("Hello", hot))).text for _ in range(4)}
    assert len(texts) > 1


async def test_leaving_client_stops_its_generation(engine) -> None:
    stream = engine.generate("Go on and on", SamplingParams(200, 1.0, 1.0))
    await anext(stream)
    passes = engine.forward_passes
    await stream.aclose()  # what Starlette does when the client disconnects
    assert engine._ongoing == 0
    # The request leaves the batch (cancelled, or done: either way the loop empties) ...
    scheduler = engine.manager.batch_processor.scheduler
    while scheduler.active_requests or scheduler.waiting_requests:
        await asyncio.sleep(0.05)
    # ... long before the 200 tokens it asked for: one pass per token had it run on.
    assert engine.forward_passes - passes < 100


async def test_over_the_limit_is_refused_at_once(engine) -> None:
    streams = [engine.generate("x", SamplingParams(50, 1.0, 1.0)) for _ in range(10)]
    await asyncio.gather(*(anext(s) for s in streams))
    with pytest.raises(EngineOverloaded, match="10 requests ongoing, limit 10"):
        await anext(engine.generate("x", GREEDY))
    for s in streams:
        await s.aclose()


async def test_a_plain_request_gets_the_streamed_text_in_one_piece(engine) -> None:
    prompt = "Tell me about Ray"
    streamed = await collect(engine.generate(prompt, GREEDY))
    chunks = [c async for c in engine.generate(prompt, replace(GREEDY, stream=False))]
    assert len(chunks) == 1  # no per-token work for a request nobody streams
    assert chunks[0].text == streamed.text
    assert chunks[0].completion_tokens == streamed.usage.completion_tokens


def test_text_is_decoded_incrementally_and_never_splits_a_character(tiny_model) -> None:
    from llmray_serve.hf_engine import _Text
    from llmray_serve.prompts import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    answer = "Zürich, 東京 and 🚀 launch: ça va!"
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    text, seen = _Text(tokenizer), []
    for n in range(1, len(ids) + 1):
        text.extend(ids[:n])
        assert not text.text.endswith("\ufffd")
        seen.append(text.send(len(text.text)))
    seen.append(text.send(len(text.flush())))
    assert "".join(seen) == tokenizer.decode(ids, skip_special_tokens=True)


async def test_an_empty_prompt_starts_a_new_document(engine) -> None:
    """OpenAI: with no prompt the model generates as if from the beginning of a new document;
    transformers' forward pass fails on no tokens at all (it used to end the loop)."""
    out = await collect(engine.generate("", GREEDY))
    assert out.usage.prompt_tokens == 1 == engine.count_tokens("")  # the bos token
    assert out.usage.completion_tokens > 0
    assert engine.healthy()


@pytest.mark.parametrize("prompt", ["<|im_end|>", "<|endoftext|><|pad|><|im_start|>", " ", "\n"])
async def test_prompts_of_special_tokens_or_whitespace_are_answered(engine, prompt) -> None:
    out = await collect(engine.generate(prompt, GREEDY))
    assert out.usage.prompt_tokens == engine.count_tokens(prompt) > 0
    assert out.finish_reason in ("stop", "length")
    assert engine.healthy()


class StepFault:
    """A forward hook that raises in the next `times` forward passes (a broken kernel, an
    out-of-memory error), installed on the real model inside the real generation loop."""

    def __init__(self, engine, times: int = 1) -> None:
        self.times = times
        self.handle = engine.model.register_forward_hook(self)

    def __call__(self, *_) -> None:
        if self.times > 0:
            self.times -= 1
            raise RuntimeError("injected: the device fell off the bus")

    def __enter__(self) -> StepFault:
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()


async def test_a_failing_step_fails_its_request_and_the_loop_goes_on(engine) -> None:
    failed = engine.steps.failed
    with StepFault(engine), pytest.raises(RuntimeError, match="the device fell off the bus"):
        await collect(engine.generate("Hello", GREEDY))
    assert engine.steps.failed == failed + 1
    assert engine.healthy() and engine.manager.is_running()
    after = await collect(engine.generate("Hello", GREEDY))  # the next request is served
    assert after.text and after.usage.completion_tokens > 0


async def test_steps_failing_in_a_row_make_the_engine_unhealthy(tiny_model) -> None:
    """A broken model or device, not a bad request: the health check fails (Ray Serve then
    replaces the replica) and requests get EngineUnavailable (a 503) at once."""
    from llmray_serve.hf_engine import TransformersEngine
    from llmray_serve.hf_steps import MAX_FAILED_STEPS

    broken = TransformersEngine(tiny_model, max_batch=2, max_ongoing=4)
    try:
        with StepFault(broken, times=10**6):
            for _ in range(MAX_FAILED_STEPS):
                with pytest.raises(RuntimeError, match="fell off the bus"):
                    await collect(broken.generate("Hi", GREEDY))
        assert not broken.healthy()
        with pytest.raises(EngineUnavailable, match="failed its last 3 steps"):
            await anext(broken.generate("Hi", GREEDY))
    finally:
        broken.close()
    assert not broken.healthy()
    with pytest.raises(EngineUnavailable, match="has stopped"):  # a dead loop: refused, no hang
        await anext(broken.generate("Hi", GREEDY))


async def test_a_stuck_step_makes_the_engine_unhealthy_while_it_lasts(engine) -> None:
    import threading

    release = threading.Event()

    def hang(*_) -> None:
        release.wait()  # a wedged kernel, until the test lets it go

    handle = engine.model.register_forward_hook(hang)
    # Longer than an idle pass of the loop (it waits 0.1 s for new requests), far shorter
    # than the hang.
    engine.steps.stuck_after_s, stuck_after = 0.5, engine.steps.stuck_after_s
    try:
        request = asyncio.ensure_future(collect(engine.generate("Hello", GREEDY)))
        while engine.healthy():
            await asyncio.sleep(0.01)
        with pytest.raises(EngineUnavailable, match="stuck"):
            await anext(engine.generate("Hi", GREEDY))
    finally:
        handle.remove()
        release.set()
        engine.steps.stuck_after_s = stuck_after
    assert (await request).usage.completion_tokens > 0
    assert engine.healthy()
