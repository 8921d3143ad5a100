"""The compiled one-token decode step (hf_compiled.py, spec.compileDecode): the engine's greedy
answers are the plain model's, its single-stream steps really run compiled, the graph keeps
no dense copy of the weights, and a model it cannot compile runs eagerly with the reason."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

from llmray_serve.engine import SamplingParams, collect

pytestmark = pytest.mark.integration

PROMPTS = [
    "Once upon a time there was a small model that learned to answer questions.",
    "The quick brown fox",
]


def greedy(model, tokenizer, text: str, tokens: int, eos: list[int]) -> str:
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=eos)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


async def test_compiled_steps_answer_as_the_plain_model_alone_and_side_by_side(tiny_model):
    from llmray_serve.hf_engine import TransformersEngine
    from llmray_serve.hf_model import load_model

    engine = TransformersEngine(
        tiny_model, dtype="float32", max_batch=4, max_ongoing=4, compile_decode=True
    )
    try:
        assert engine.compiled is not None
        params = SamplingParams(12, 0.0, 1.0)
        before = engine.compiled.steps
        alone = [(await collect(engine.generate(p, params))).text for p in PROMPTS]
        # one request at a time: every step after each prompt's prefill is a one-token step
        assert engine.compiled.steps - before >= 2 * 10
        together = await asyncio.gather(*(collect(engine.generate(p, params)) for p in PROMPTS))
        # the graph's own copy of the weights is packed; its dense inputs were let go
        assert type(engine.compiled.l0_qkv).__name__ == "ErasedTensor"
    finally:
        engine.close()
    plain, _ = load_model(tiny_model, dtype="float32")
    expected = [greedy(plain, engine.tokenizer, p, 12, engine.eos_ids) for p in PROMPTS]
    assert alone == expected
    assert [r.text for r in together] == expected


def test_a_model_it_cannot_compile_runs_eagerly_and_says_why(tiny_model, caplog) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmray_serve.hf_compiled import CompiledDecode, why_not
    from llmray_serve.hf_model import load_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert "not a Llama-family model" in why_not(gpt2)
    unfused, _ = load_model(tiny_model, dtype="float32")  # adapters keep the layers unfused
    assert "not fused" in why_not(unfused)
    bf16, _ = load_model(tiny_model, dtype="float32")
    assert "only float32" in why_not(bf16.to(torch.bfloat16))
    with caplog.at_level("WARNING"):
        assert CompiledDecode.of(unfused) is None
    assert "compileDecode: the decode step runs eagerly" in caplog.text


def test_spec_compile_decode_reaches_the_replicas_args() -> None:
    import yaml

    from llmray.api.validation import parse_llmdeployment
    from llmray.serve_args import resolve_serve_args
    from llmray_operator import rayservice

    def dep(**spec):
        return parse_llmdeployment(
            {
                "apiVersion": "llmray.io/v1alpha1",
                "kind": "LLMDeployment",
                "metadata": {"name": "demo", "namespace": "ml"},
                "spec": {"model": {"uri": "s3://bucket/models/demo"}, **spec},
            }
        )

    assert resolve_serve_args(dep(), model_uri="x").compile_decode is False
    on = dep(compileDecode=True)
    config = rayservice.serve_config(rayservice.serve_args(on, "s3://bucket/models/demo"))
    assert yaml.safe_load(config)["applications"][0]["args"]["compile_decode"] is True


def test_without_a_cpp_compiler_the_engine_runs_eagerly_and_says_why(tiny_model) -> None:
    # Where the image has no C++ compiler, inductor fails its first build. In a fresh
    # process (inductor looks its compiler up once), with CXX naming one that is not there
    # and no cached build to reuse.
    script = textwrap.dedent(
        f"""
        import asyncio, logging
        from llmray_serve.engine import SamplingParams, collect
        from llmray_serve.hf_engine import TransformersEngine
        logging.basicConfig(level=logging.WARNING)
        engine = TransformersEngine({str(tiny_model)!r}, dtype="float32", max_batch=4,
                                    max_ongoing=4, compile_decode=True)
        out = asyncio.run(collect(engine.generate({PROMPTS[1]!r}, SamplingParams(8, 0.0, 1.0))))
        print("ANSWER", repr(out.text), bool(engine.compiled.failed), engine.compiled.steps)
        engine.close()
        """
    )
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compileDecode: the step did not compile, it runs eagerly" in done.stderr
    answer = next(line for line in done.stdout.splitlines() if line.startswith("ANSWER "))
    from transformers import AutoTokenizer

    from llmray_serve.hf_model import load_model

    plain, _ = load_model(tiny_model, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = [tokenizer.eos_token_id]
    expected = greedy(plain, tokenizer, PROMPTS[1], 8, eos)
    assert answer == f"ANSWER {expected!r} True 0"
