"""The vLLM engine (NVIDIA GPUs): vLLM's continuous batching, paged attention and CUDA kernels
behind the same Engine interface as the transformers engine.

vLLM does the scheduling, sampling (per-request temperature, top_p, seed) and stop strings;
this adapter turns its cumulative outputs into text deltas, aborts a request whose client
left, and refuses requests past the replica's limit (503) as the transformers engine does.
Prompts are tokenized here with the model's own tokenizer (the chat template and token
counts then match the transformers engine exactly) and given to vLLM as token ids.

    engine = VLLMEngine("/models/llama-7b", num_gpus=1, max_ongoing=64, max_seq_tokens=4096)
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

from llmray_serve.engine import Chunk, EngineOverloaded, SamplingParams
from llmray_serve.prompts import TokenizerPrompts, load_tokenizer

VLLM_HELP = (
    "spec.engine vllm needs vLLM and an NVIDIA GPU: use the server's -gpu image "
    "(it installs vLLM), or engine transformers"
)


class VLLMEngine(TokenizerPrompts):
    def __init__(
        self,
        model_dir: str | Path,
        *,
        num_gpus: int = 1,
        max_ongoing: int = 64,
        max_seq_tokens: int = 2048 + 256,
    ) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise RuntimeError(f"{VLLM_HELP}; import failed: {exc}") from exc
        self.tokenizer = load_tokenizer(model_dir)
        self.max_ongoing = max_ongoing
        self._ongoing = 0
        self._ids = itertools.count()
        self.engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(
                model=str(model_dir),
                tensor_parallel_size=max(1, num_gpus),  # one replica spans its GPUs
                # Those GPUs are already the replica actor's (one pod): vLLM's workers are
                # its own processes, not Ray actors asking Ray for GPUs again.
                distributed_executor_backend="mp",
                max_model_len=max_seq_tokens,  # maxPromptTokens + maxNewTokens
                max_num_seqs=max_ongoing,  # everything admitted decodes together
                enable_prefix_caching=True,  # a shared system prompt is computed once
            )
        )

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams as VllmSampling

        if self._ongoing >= self.max_ongoing:
            raise EngineOverloaded(f"{self._ongoing} requests ongoing, limit {self.max_ongoing}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sampling = VllmSampling(
            max_tokens=params.max_tokens,
            temperature=max(params.temperature, 0.0),  # 0: greedy
            top_p=params.top_p if params.temperature > 0 else 1.0,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        request_id = f"llmray-{next(self._ids)}"
        self._ongoing += 1
        finished, sent = False, ""
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, sampling, request_id):
                done = out.outputs[0]
                # vLLM's text is cumulative and holds back a possible stop string's start.
                new = done.text[len(sent) :] if done.text.startswith(sent) else ""
                sent = done.text if new else sent
                if done.finish_reason is not None:
                    finished = True
                    reason = "length" if done.finish_reason == "length" else "stop"
                    yield Chunk(new, len(ids), len(done.token_ids), reason)
                    return
                if new:
                    yield Chunk(new, len(ids), len(done.token_ids))
        finally:
            if not finished:  # the client left: free its place in the batch now
                await self.engine.abort(request_id)
            self._ongoing -= 1

    def healthy(self) -> bool:
        return not self.engine.errored

    def close(self) -> None:
        self.engine.shutdown()


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_kind(engine: str, accelerator: str) -> str:
    """`auto`: vLLM on NVIDIA GPUs where it is installed (the -gpu image), else transformers."""
    if engine != "auto":
        return engine
    return "vllm" if accelerator == "nvidia-gpu" and vllm_available() else "transformers"
