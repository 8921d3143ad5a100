"""The transformers engine in the precision asked for, on the tiny model: int8 generates
through continuous batching, and its predictions stay close to float32's."""

from __future__ import annotations

import math

import pytest

from llmray_serve.engine import SamplingParams, collect

pytestmark = pytest.mark.integration

TEXT = "Once upon a time there was a small model that answered questions about the sea."


def nll_per_token(model, ids: list[int]) -> tuple[float, object]:
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return float(nll), logprobs


def test_int8_predicts_close_to_float32(tiny_model) -> None:
    import torch

    from llmray_serve.hf_model import load_model
    from llmray_serve.prompts import load_tokenizer

    ids = load_tokenizer(tiny_model)(TEXT)["input_ids"]
    fp32, p32 = load_model(tiny_model, dtype="float32")
    int8, p8 = load_model(tiny_model, quantization="int8")
    assert (p32.dtype, p8.dtype, p8.quantization) == ("float32", "float32", "int8")
    assert isinstance(int8.model.layers[0].self_attn.q_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.lm_head, torch.nn.Linear)  # kept in float32
    nll32, lp32 = nll_per_token(fp32, ids)
    nll8, lp8 = nll_per_token(int8, ids)
    # Perplexity within 5% of float32's, and the same most likely next token almost
    # everywhere (a broken quantization lands far off both).
    assert math.exp(nll8) / math.exp(nll32) == pytest.approx(1.0, abs=0.05)
    agree = (lp32.argmax(-1) == lp8.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


async def test_int8_engine_generates_with_continuous_batching(tiny_model) -> None:
    import asyncio

    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, quantization="int8", max_batch=4, max_ongoing=8)
    try:
        assert engine.precision.details() == {"dtype": "float32", "quantization": "int8"}
        greedy = SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0)
        results = await asyncio.gather(*(collect(engine.generate(TEXT, greedy)) for _ in range(4)))
        assert all(r.usage.completion_tokens > 0 for r in results)
        assert len({r.text for r in results}) == 1  # greedy in one batch: the same answer
    finally:
        engine.close()
