"""The vLLM engine adapter.

vLLM cannot run here: it needs a CUDA GPU, and the -gpu image's vLLM (0.32.0, the Dockerfile's
VLLM_VERSION) pins transformers < 5.20 and fastapi < 0.137 against this project's
transformers 5.23 and fastapi 0.165 (its torch pin, 2.13.0, is the project's). So beyond the
real "not installed" error, these tests put a fake `vllm` module in place (the mock is the
engine only: the tokenizer is the tiny model's real one) that follows vLLM 0.32's API as the
adapter uses it: `AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`,
`generate({"prompt_token_ids"}, SamplingParams, request_id)` yielding cumulative
`RequestOutput`s (one `CompletionOutput` per choice: index, text, token_ids, logprobs as
token id -> Logprob(logprob, rank, decoded_token), finish_reason; the prompt's token ids
and logprobs), `abort`, `errored`, `shutdown`, `vllm.config.StructuredOutputsConfig` and
`vllm.sampling_params.StructuredOutputsParams`.
"""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field, replace

import pytest

from llmray_serve.engine import EngineOverloaded, InvalidParameter, SamplingParams, collect
from llmray_serve.vllm_engine import VLLMEngine, engine_kind

ANSWER = ["Ray", " is", " a", " framework", "."]


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    index: int = 0
    logprobs: list[dict] | None = None


@dataclass
class _Output:
    outputs: list[_Completion]
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class _Logprob:  # vLLM's Logprob
    logprob: float
    rank: int
    decoded_token: str | None = None


def _position(token: int, k: int, top: int) -> dict:
    """vLLM's logprobs of one position: the top ones, and the chosen token (less likely)."""
    out = {1000 + r: _Logprob(-0.1 * r, r, f"alt{r}") for r in range(1, top + 1)}
    out[token] = _Logprob(-1.0 - k, top + 3, ANSWER[k] if k < len(ANSWER) else None)
    return out


@dataclass
class _FakeEngine:
    args: dict
    requests: list[tuple[dict, dict, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    errored: bool = False
    loras: dict = field(default_factory=dict)  # lora_int_id -> LoRARequest added
    lora_of: dict = field(default_factory=dict)  # request id -> the LoRARequest it came with

    async def add_lora(self, request):
        self.loras[request.lora_int_id] = request
        return True

    async def remove_lora(self, lora_id):
        return self.loras.pop(lora_id, None) is not None

    async def generate(self, prompt, sampling, request_id, lora_request=None):
        self.requests.append((prompt, vars(sampling), request_id))
        self.lora_of[request_id] = lora_request
        limit = min(sampling.max_tokens, len(ANSWER))
        ids = prompt["prompt_token_ids"]
        scored = None
        if sampling.prompt_logprobs is not None:
            scored = [None] + [_position(t, 0, sampling.prompt_logprobs) for t in ids[1:]]
        for n in range(1, limit + 1):
            await asyncio.sleep(0)
            reason = None if n < limit else ("length" if n == sampling.max_tokens else "stop")
            outputs = []
            for index in range(sampling.n):
                tokens = [10 * index + k for k in range(n)]
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = [_position(t, k, sampling.logprobs) for k, t in enumerate(tokens)]
                text = "".join(ANSWER[:n])
                outputs.append(_Completion(text, tokens, reason, index, logprobs))
            yield _Output(outputs, ids, scored)

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

    @dataclass
    class StructuredOutputsConfig:
        backend: str = "auto"

    @dataclass
    class StructuredOutputsParams:
        grammar: str | None = None

    vllm.AsyncEngineArgs, vllm.AsyncLLMEngine, vllm.SamplingParams = (
        AsyncEngineArgs,
        AsyncLLMEngine,
        SamplingParams,
    )

    @dataclass
    class LoRARequest:  # vllm.lora.request.LoRARequest
        lora_name: str
        lora_int_id: int
        lora_path: str = ""

    lora = types.ModuleType("vllm.lora")
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = LoRARequest
    lora.request = lora_request
    vllm.lora = lora
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_request)
    config = types.ModuleType("vllm.config")
    config.StructuredOutputsConfig = StructuredOutputsConfig
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.StructuredOutputsParams = StructuredOutputsParams
    vllm.config, vllm.sampling_params = config, sampling_params
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_params)
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


def test_auto_dtype_is_resolved_before_vllm_sees_it(fake_vllm, tiny_model, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    engine = VLLMEngine(tiny_model)
    assert engine.engine.args["dtype"] == "float16"  # a GPU without bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert VLLMEngine(tiny_model).engine.args["dtype"] == "bfloat16"


async def test_deltas_reassemble_and_params_reach_vllm(fake_vllm, tiny_model) -> None:
    engine = VLLMEngine(
        tiny_model, num_gpus=2, max_ongoing=8, max_seq_tokens=4096, dtype="bfloat16"
    )
    assert engine.precision.details() == {"dtype": "bfloat16", "quantization": "none"}
    assert engine.engine.args == {
        "model": str(tiny_model),
        "dtype": "bfloat16",  # spec.dtype, resolved by llmray (auto: bf16 where supported)
        "tensor_parallel_size": 2,
        "distributed_executor_backend": "mp",
        "max_model_len": 4096,
        "max_num_seqs": 8,
        "enable_prefix_caching": True,
        "structured_outputs_config": fake_vllm.config.StructuredOutputsConfig("guidance"),
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
        "n": 1,
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": ["\n"],
        "seed": 7,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": None,
        "logprobs": None,
        "prompt_logprobs": None,
        "structured_outputs": None,
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


async def test_every_parameter_reaches_vllms_sampling(fake_vllm, tiny_model) -> None:
    engine = VLLMEngine(tiny_model)
    params = SamplingParams(
        4,
        1.0,
        0.9,
        n=3,
        logprobs=2,
        prompt_logprobs=1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=((5, -100.0), (9, 2.0)),
        grammar='start: "x"\n',
    )
    out = await collect(engine.generate("Hi there", params))
    sampling = engine.engine.requests[-1][1]
    assert sampling["n"] == 3 and sampling["logprobs"] == 2 and sampling["prompt_logprobs"] == 1
    assert (sampling["presence_penalty"], sampling["frequency_penalty"]) == (0.5, -0.5)
    assert sampling["logit_bias"] == {5: -100.0, 9: 2.0}
    assert sampling["structured_outputs"] == fake_vllm.sampling_params.StructuredOutputsParams(
        'start: "x"\n'
    )
    # n choices, each whole; logprobs per token with the top 2 best first; prompt scored.
    assert sorted(out.choices) == [0, 1, 2]
    assert all(c.text == "Ray is a framework" for c in out.choices.values())
    assert out.usage.completion_tokens == 12
    tokens = out.choices[1].logprobs
    assert [t.id for t in tokens] == [10, 11, 12, 13]
    assert [t.token for t in tokens] == ANSWER[:4]
    assert tokens[1].logprob == -2.0 and tokens[1].top == (("alt1", -0.1), ("alt2", -0.2))
    prompt_ids = engine.prompt_ids("Hi there")
    scored = out.choices[0].prompt_logprobs
    assert [t.id for t in scored] == prompt_ids and scored[0].logprob is None
    assert scored[1].top == (("alt1", -0.1),)


async def test_n_beyond_the_replicas_limit_is_a_400_and_bias_is_checked(
    fake_vllm, tiny_model
) -> None:
    engine = VLLMEngine(tiny_model, max_ongoing=4)
    with pytest.raises(InvalidParameter, match="at most 4 choices"):
        await anext(engine.generate("Hi", SamplingParams(4, 1.0, 1.0, n=5)))
    with pytest.raises(InvalidParameter, match="not in this model's vocabulary"):
        await anext(engine.generate("Hi", SamplingParams(4, 1.0, 1.0, logit_bias=((10**7, 1),))))
    assert engine._ongoing == 0 and not engine.engine.requests


def test_without_adapters_vllm_gets_no_lora_arguments(fake_vllm, tiny_model) -> None:
    engine = VLLMEngine(tiny_model, max_ongoing=4)
    assert not {k for k in engine.engine.args if "lora" in k}


async def test_adapters_are_lora_requests_of_their_own(fake_vllm, tiny_model) -> None:
    """spec.maxLoadedAdapters and maxAdapterRank become vLLM's LoRA limits; each adapter
    is added once as a LoRARequest with an id of its own and goes with each of its requests;
    unloading removes it from vLLM."""
    engine = VLLMEngine(tiny_model, max_ongoing=4, max_loras=3, max_lora_rank=32)
    args = engine.engine.args
    assert args["enable_lora"] is True
    assert (args["max_loras"], args["max_cpu_loras"], args["max_lora_rank"]) == (3, 3, 32)
    await engine.load_adapter("a1", "/adapters/legal")
    await engine.load_adapter("a2", "/adapters/support")
    added = engine.engine.loras
    assert sorted((r.lora_name, r.lora_path) for r in added.values()) == [
        ("a1", "/adapters/legal"),
        ("a2", "/adapters/support"),
    ]
    assert len(set(added)) == 2 and all(i > 0 for i in added)  # vLLM wants positive ids
    params = SamplingParams(max_tokens=3, temperature=0.0, top_p=1.0)
    await collect(engine.generate("Hi", replace(params, adapter="a2")))
    await collect(engine.generate("Hi", params))
    (first, second) = engine.engine.lora_of.values()
    assert (first.lora_name, first.lora_path) == ("a2", "/adapters/support")
    assert second is None  # the base model
    await engine.unload_adapter("a1")
    assert [r.lora_name for r in engine.engine.loras.values()] == ["a2"]
