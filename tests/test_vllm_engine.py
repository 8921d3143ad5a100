"""The vLLM engine adapter.

vLLM cannot run here: it needs a CUDA GPU, and its wheel pins torch 2.14 / transformers < 5.21
against this project's torch 2.13 / transformers 5.23. So beyond the real "not installed"
error, these tests put a fake `vllm` module in place (the mock is the engine only: the
tokenizer is the tiny model's real one) that follows vLLM 0.33's API as the adapter uses it:
`AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`, `generate({"prompt_token_ids"},
SamplingParams, request_id)` yielding cumulative `RequestOutput`s, `abort`, `errored`.
"""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field

import pytest

from llmray_serve.engine import EngineOverloaded, SamplingParams, collect
from llmray_serve.vllm_engine import VLLMEngine, engine_kind

ANSWER = ["Ray", " is", " a", " framework", "."]


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Output:
    outputs: list[_Completion]


@dataclass
class _FakeEngine:
    args: dict
    requests: list[tuple[dict, dict, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    errored: bool = False

    async def generate(self, prompt, sampling, request_id):
        self.requests.append((prompt, vars(sampling), request_id))
        limit = min(sampling.max_tokens, len(ANSWER))
        for n in range(1, limit + 1):
            await asyncio.sleep(0)
            reason = None if n < limit else ("length" if n == sampling.max_tokens else "stop")
            yield _Output([_Completion("".join(ANSWER[:n]), list(range(n)), reason)])

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def shutdown(self):
        self.errored = True


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")

    class AsyncEngineArgs:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class AsyncLLMEngine:
        @staticmethod
        def from_engine_args(args):
            return _FakeEngine(args.kwargs)

    class SamplingParams:  # vLLM's is a msgspec struct with these keyword fields
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    vllm.AsyncEngineArgs, vllm.AsyncLLMEngine, vllm.SamplingParams = (
        AsyncEngineArgs,
        AsyncLLMEngine,
        SamplingParams,
    )
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    return vllm


def test_without_vllm_the_error_says_what_to_do(tiny_model) -> None:
    if engine_kind("auto", "nvidia-gpu") == "vllm":
        pytest.skip("vLLM is installed here")
    with pytest.raises(RuntimeError, match=r"spec\.engine vllm needs vLLM and an NVIDIA GPU"):
        VLLMEngine(tiny_model)
    assert engine_kind("auto", "nvidia-gpu") == "transformers"  # auto falls back


def test_auto_picks_vllm_on_nvidia_gpus_only(monkeypatch) -> None:
    from llmray_serve import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    assert engine_kind("auto", "nvidia-gpu") == "vllm"
    assert engine_kind("auto", "cpu") == "transformers"
    assert engine_kind("auto", "intel-gpu") == "transformers"
    assert engine_kind("transformers", "nvidia-gpu") == "transformers"


async def test_deltas_reassemble_and_params_reach_vllm(fake_vllm, tiny_model) -> None:
    engine = VLLMEngine(tiny_model, num_gpus=2, max_ongoing=8, max_seq_tokens=4096)
    assert engine.engine.args == {
        "model": str(tiny_model),
        "tensor_parallel_size": 2,
        "distributed_executor_backend": "mp",
        "max_model_len": 4096,
        "max_num_seqs": 8,
        "enable_prefix_caching": True,
    }
    chunks = [c async for c in engine.generate("Hi", SamplingParams(16, 0.0, 0.5, ("\n",), seed=7))]
    assert "".join(c.text for c in chunks) == "Ray is a framework."
    assert [c.text for c in chunks] == ANSWER
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 5
    assert chunks[-1].prompt_tokens == engine.count_tokens("Hi")
    prompt, sampling, _ = engine.engine.requests[-1]
    assert prompt == {
        "prompt_token_ids": engine.tokenizer("Hi", add_special_tokens=False)["input_ids"]
    }
    # temperature 0 is greedy: top_p is then meaningless and reset.
    assert sampling == {
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["\n"],
        "seed": 7,
    }
    cut = await collect(engine.generate("Hi", SamplingParams(3, 0.8, 0.9)))
    assert cut.text == "Ray is a" and cut.finish_reason == "length"
    assert engine.engine.requests[-1][1]["top_p"] == 0.9 and engine.engine.aborted == []


async def test_a_client_that_leaves_aborts_its_request(fake_vllm, tiny_model) -> None:
    engine = VLLMEngine(tiny_model)
    stream = engine.generate("Hi", SamplingParams(16, 1.0, 1.0))
    await anext(stream)
    await stream.aclose()
    assert engine.engine.aborted == [engine.engine.requests[-1][2]]
    assert engine._ongoing == 0


async def test_over_the_limit_is_refused_at_once(fake_vllm, tiny_model) -> None:
    engine = VLLMEngine(tiny_model, max_ongoing=1)
    first = engine.generate("Hi", SamplingParams(16, 1.0, 1.0))
    await anext(first)
    with pytest.raises(EngineOverloaded, match="1 requests ongoing, limit 1"):
        await anext(engine.generate("Hi", SamplingParams(16, 1.0, 1.0)))
    await first.aclose()
    assert engine.healthy()
    engine.close()
    assert not engine.healthy()
