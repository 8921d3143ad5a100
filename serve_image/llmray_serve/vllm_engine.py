"""The vLLM engine (NVIDIA GPUs): vLLM's continuous batching, paged attention and CUDA kernels
behind the same Engine interface as the transformers engine.

vLLM does the scheduling, sampling (per-request temperature, top_p, seed, n, penalties,
logit_bias), logprobs (the model's own, vLLM's default "raw_logprobs"), the prompt's logprobs
(echo) and stop strings; grammars go to vLLM's structured outputs with its "guidance" backend
(llguidance: the same library and grammar text the transformers engine uses, grammars.py).
This adapter turns its cumulative outputs into per-choice deltas, aborts a request whose
client left, and refuses requests past the replica's limit (503) as the transformers engine
does. Prompts are tokenized here with the model's own tokenizer (the chat template and token
counts then match the transformers engine exactly) and given to vLLM as token ids.

    engine = VLLMEngine("/models/llama-7b", num_gpus=1, max_ongoing=64, max_seq_tokens=4096)

LoRA adapters (max_loras > 0): vLLM's `enable_lora`, with a batch holding up to `max_loras`
adapters (spec.maxLoadedAdapters, the registry's limit too) of rank up to `max_lora_rank`
(spec.maxAdapterRank); each loaded adapter is one `LoRARequest(name, int id, path)` added to
the engine at load (so a bad adapter fails its load, not a request) and passed with each of
its requests.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmray.api.llmdeployment import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS
from llmray.precision import DTYPE_DEFAULT
from llmray_serve.engine import (
    Chunk,
    EngineOverloaded,
    EngineUnavailable,
    InvalidParameter,
    SamplingParams,
    TokenLogprob,
)
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
        max_seq_tokens: int = MAX_PROMPT_TOKENS + MAX_NEW_TOKENS,
        dtype: str = DTYPE_DEFAULT,
        max_loras: int = 0,
        max_lora_rank: int = 16,
    ) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
            from vllm.config import StructuredOutputsConfig
        except ImportError as exc:
            raise RuntimeError(f"{VLLM_HELP}; import failed: {exc}") from exc
        from llmray_serve.hf_model import Precision, resolve

        resolved = resolve("cuda", dtype, "none")  # vLLM's own auto would follow config.json
        self.precision = Precision(resolved.dtype, "none", resolved.reason)
        self.tokenizer = load_tokenizer(model_dir)
        self.special_ids = set(self.tokenizer.all_special_ids)  # not in the text: no logprobs
        self.max_ongoing = max_ongoing
        self._ongoing = 0
        self._ids = itertools.count()
        self._lora_ids = itertools.count(1)  # vLLM's lora_int_id: positive, unique
        self.loras: dict[str, Any] = {}  # adapter key -> its LoRARequest
        self.engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(
                **lora_args(max_loras, max_lora_rank),
                model=str(model_dir),
                dtype=resolved.dtype,
                tensor_parallel_size=max(1, num_gpus),  # one replica spans its GPUs
                # Those GPUs are already the replica actor's (one pod): vLLM's workers are
                # its own processes, not Ray actors asking Ray for GPUs again.
                distributed_executor_backend="mp",
                max_model_len=max_seq_tokens,  # maxPromptTokens + maxNewTokens
                max_num_seqs=max_ongoing,  # everything admitted decodes together
                enable_prefix_caching=True,  # a shared system prompt is computed once
                # llguidance, as the transformers engine: the grammars are its Lark dialect.
                structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
            )
        )

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=path)
        await self.engine.add_lora(request)
        self.loras[name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self.loras.pop(name)
        await self.engine.remove_lora(request.lora_int_id)

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams as VllmSampling

        if not self.healthy():
            raise EngineUnavailable("vLLM's engine has failed")
        if params.n > self.max_ongoing:
            raise InvalidParameter(
                "n", f"n: at most {self.max_ongoing} choices per request (maxOngoingRequests)"
            )
        if self._ongoing + params.n > self.max_ongoing:
            raise EngineOverloaded(f"{self._ongoing} requests ongoing, limit {self.max_ongoing}")
        self.check_logit_bias(params)
        ids = self.prompt_ids(prompt)
        sampling = VllmSampling(
            n=params.n,
            max_tokens=params.max_tokens,
            temperature=max(params.temperature, 0.0),  # 0: greedy
            top_p=params.top_p if params.temperature > 0 else 1.0,
            stop=list(params.stop) or None,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=dict(params.logit_bias) or None,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            structured_outputs=_structured(params.grammar),
        )
        request_id = f"llmray-{next(self._ids)}"
        self._ongoing += params.n
        finished: set[int] = set()
        sent: dict[int, str] = {}  # choice -> text sent
        scored: dict[int, int] = {}  # choice -> logprobs sent
        try:
            lora = self.loras[params.adapter] if params.adapter is not None else None
            async for out in self.engine.generate(
                {"prompt_token_ids": ids}, sampling, request_id, lora_request=lora
            ):
                for done in out.outputs:
                    if done.index in finished:
                        continue
                    chunk = self._chunk(out, done, len(ids), sent, scored, params)
                    if chunk.finish_reason is not None:
                        finished.add(done.index)
                    if chunk.finish_reason or chunk.text or chunk.logprobs:
                        yield chunk
                if len(finished) == params.n:
                    return
        finally:
            if len(finished) < params.n:  # the client left: free its place in the batch now
                await self.engine.abort(request_id)
            self._ongoing -= params.n

    def _chunk(
        self,
        out: Any,
        done: Any,
        prompt_tokens: int,
        sent: dict[int, str],
        scored: dict[int, int],
        params: SamplingParams,
    ) -> Chunk:
        """Choice `done.index`'s news in `out` (vLLM's outputs are cumulative; its text holds
        back a possible stop string's start)."""
        index = done.index
        before = sent.get(index, "")
        new = done.text[len(before) :] if done.text.startswith(before) else ""
        sent[index] = done.text if new else before
        first = index not in scored
        logprobs: tuple[TokenLogprob, ...] = ()
        if params.logprobs is not None and done.logprobs is not None:
            start, scored[index] = scored.get(index, 0), len(done.logprobs)
            logprobs = tuple(
                self._logprob(token, done.logprobs[k], params.logprobs)
                for k, token in enumerate(done.token_ids[start : len(done.logprobs)], start)
                if token not in self.special_ids
            )
        scored.setdefault(index, 0)
        reason = None
        if done.finish_reason is not None:
            reason = "length" if done.finish_reason == "length" else "stop"
        prompt_logprobs = None
        if first and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
            prompt_logprobs = self._prompt_logprobs(out, params.prompt_logprobs)
        return Chunk(
            new, prompt_tokens, len(done.token_ids), reason, index, logprobs, prompt_logprobs
        )

    def _logprob(self, token: int, position: dict[int, Any], top: int) -> TokenLogprob:
        """A position of vLLM's logprobs (token id -> Logprob(logprob, rank, decoded_token)):
        the chosen token and, best first, the `top` most likely."""
        best = sorted((lp.rank, t, lp) for t, lp in position.items() if lp.rank <= top)
        chosen = position[token]
        return TokenLogprob(
            self._text(token, chosen),
            chosen.logprob,
            tuple((self._text(t, lp), lp.logprob) for _, t, lp in best[:top]),
            token,
        )

    def _prompt_logprobs(self, out: Any, top: int) -> tuple[TokenLogprob, ...]:
        first, *rest = out.prompt_token_ids
        scored = [TokenLogprob(self.token_text(first), None, (), first)]
        for token, position in zip(rest, out.prompt_logprobs[1:], strict=True):
            scored.append(self._logprob(token, position, top))
        return tuple(scored)

    def _text(self, token: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if decoded is not None else self.token_text(token)

    def healthy(self) -> bool:
        return not self.engine.errored

    def close(self) -> None:
        self.engine.shutdown()


def lora_args(max_loras: int, max_lora_rank: int) -> dict[str, Any]:
    """vLLM's engine arguments for LoRA: none without adapters (LoRA's kernels cost memory
    and time even unused)."""
    if not max_loras:
        return {}
    return {
        "enable_lora": True,
        "max_loras": max_loras,  # adapters in one batch; the registry loads no more
        "max_cpu_loras": max_loras,  # and keeps no more than that in host memory
        "max_lora_rank": max_lora_rank,
    }


def _structured(grammar: str | None) -> Any:
    if grammar is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(grammar=grammar)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_kind(engine: str, accelerator: str) -> str:
    """`auto`: vLLM on NVIDIA GPUs where it is installed (the -gpu image), else transformers."""
    if engine != "auto":
        return engine
    return "vllm" if accelerator == "nvidia-gpu" and vllm_available() else "transformers"
