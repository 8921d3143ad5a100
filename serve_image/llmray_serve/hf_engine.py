"""The transformers engine: continuous batching on CPU or CUDA, with transformers' own manager.

transformers' `ContinuousBatchingManager` (the engine behind `transformers serve
--continuous-batching`) runs one generation thread over a paged KV cache: a request joins the
running batch between two decode steps and leaves it as soon as it is done, so concurrent
requests share every forward pass and a short answer never waits for a long one. Prompts that
share a prefix (a system prompt) share its cache blocks.

This module adds what an OpenAI server needs on top: per-request temperature (0 is exact
greedy) and top_p, stop strings, incremental UTF-8-safe text, cancellation when a client
leaves, an in-flight limit (503 beyond it), and a KV cache sized from the deployment's limits
rather than from the host's memory (on a pod, the host's memory is not the pod's).

    engine = TransformersEngine("models/tiny", max_ongoing=16)
    async for chunk in engine.generate("Hello", SamplingParams(16, 0.0, 1.0)): ...
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper as _Temperature,
)
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopPLogitsWarper as _TopP,
)

from llmray_serve.engine import Chunk, EngineOverloaded, SamplingParams
from llmray_serve.prompts import TokenizerPrompts, load_tokenizer

IPEX_HELP = (
    "compute.ipex: true needs Intel Extension for PyTorch 2.8, which requires torch 2.8.* "
    "(see docs/ipex.md)"
)
PAGE_TOKENS = 256  # tokens per KV cache block (transformers' default page size)


class TransformersEngine(TokenizerPrompts):
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        ipex: bool = False,
        max_batch: int = 16,
        max_ongoing: int = 64,
        max_seq_tokens: int = 2048 + 256,
    ) -> None:
        """`max_batch` requests decode together; `max_seq_tokens` is a prompt plus its answer
        at most (maxPromptTokens + maxNewTokens): the KV cache holds `max_batch` of them."""
        self.tokenizer = load_tokenizer(model_dir)
        dtype = torch.bfloat16 if _fast_bf16(device) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa"
        )
        model = model.to(device).eval()
        if ipex:
            try:
                import intel_extension_for_pytorch as ipex_mod  # type: ignore[import-not-found]
            except ImportError as exc:
                raise RuntimeError(f"{IPEX_HELP}; import failed: {exc}") from exc
            model = ipex_mod.optimize(model, dtype=dtype)
        self.model, self.device = model, device
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.max_batch, self.max_ongoing = max_batch, max_ongoing
        self._ongoing = 0
        self._ids = itertools.count()
        # Forward passes so far: with batching, far fewer than the tokens generated.
        self.forward_passes = 0
        model.register_forward_hook(self._count_forward)
        self.manager = _start_manager(model, self.eos_ids, device, max_batch, max_seq_tokens)
        self._warm_up()

    # --- the Engine interface (count_tokens and render_chat: TokenizerPrompts) ---

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        if self._ongoing >= self.max_ongoing:
            raise EngineOverloaded(f"{self._ongoing} requests ongoing, limit {self.max_ongoing}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        request_id = f"llmray-{next(self._ids)}"
        if params.seed is not None and self._ongoing == 0:
            torch.manual_seed(params.seed)  # reproducible for a request alone in the engine
        self._ongoing += 1
        finished = False
        try:
            self.manager.register_result_handler(request_id, outputs.put_nowait)
            self.manager.add_request(
                ids,
                request_id=request_id,
                max_new_tokens=params.max_tokens,
                # Token by token only where someone reads them: a stream, or stop strings to
                # look for; a plain request gets its answer once (far less work per step).
                streaming=params.stream or bool(params.stop),
                eos_token_id=self.eos_ids,
                temperature=float(max(params.temperature, 0.0)),
                top_p=float(params.top_p) if params.temperature > 0 else 1.0,
            )
            text = _Text(self.tokenizer)
            while True:
                out = await outputs.get()
                if out.error:
                    finished = True
                    raise RuntimeError(f"generation failed: {out.error}")
                text.extend([t for t in out.generated_tokens if t not in self.eos_ids])
                chunk = self._next_chunk(out, text, len(ids), params)
                if chunk.finish_reason:
                    finished = out.is_finished()
                    yield chunk
                    return
                if chunk.text:
                    yield chunk
        finally:
            if not finished:  # a client that left, or a stop string: free its batch slot now
                self._cancel(request_id)
            self._ongoing -= 1

    def healthy(self) -> bool:
        return self.manager.is_running()

    def close(self) -> None:
        """Stop the generation loop (requests still running are failed)."""
        self.manager.stop(block=True, timeout=30, hard_stop=True)

    # --- internals ---

    def _next_chunk(
        self, out: Any, text: _Text, prompt_tokens: int, params: SamplingParams
    ) -> Chunk:
        """The text added since the last chunk: cut before a stop string, and while
        streaming, text that may be the start of a stop string waits for the next tokens."""
        done, tokens = out.is_finished(), len(text.ids)
        full = text.text if not done else text.flush()
        for stop in params.stop:
            at = full.find(stop)
            if at != -1:
                return Chunk(text.send(max(at, text.sent)), prompt_tokens, tokens, "stop")
        if not done:
            keep = len(full) - _stop_prefix_len(full, params.stop)
            return Chunk(text.send(keep), prompt_tokens, tokens)
        hit_eos = bool(out.generated_tokens) and out.generated_tokens[-1] in self.eos_ids
        reason = "length" if tokens >= params.max_tokens and not hit_eos else "stop"
        return Chunk(text.send(len(full)), prompt_tokens, tokens, reason)

    def _cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)
        # A cancelled request gets no final output, so its handler would stay registered: drop
        # it (a token already in flight then lands in the unread shared queue; drain that too).
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)
        while not router.output_queue.empty():
            router.output_queue.get_nowait()

    def _warm_up(self) -> None:
        """One token through the whole path: the first request must not pay for setup."""
        request_id = self.manager.add_request(
            [self.eos_ids[0] if self.eos_ids else 0], max_new_tokens=1, temperature=0.0, top_p=1.0
        )
        while (out := self.manager.get_result(request_id, timeout=60)) is not None:
            if out.is_finished():
                return
        raise RuntimeError("the generation loop did not answer its warm-up request")

    def _count_forward(self, *_: Any) -> None:
        self.forward_passes += 1


class _Text:
    """A request's answer, decoded a few tokens at a time (not the whole answer per token),
    never ending in half a UTF-8 character; `sent` counts the characters already sent."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.text, self.sent = tokenizer, [], "", 0
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the end of `text`

    def extend(self, ids: list[int]) -> None:
        """`ids`: the whole answer so far (the tokens past the known ones are new)."""
        self.ids.extend(ids[len(self.ids) :])
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> str:
        """The final text, including a trailing partial character if the answer ended so."""
        rest = self._decode(self.ids[self._prefix :])[
            len(self._decode(self.ids[self._prefix : self._read])) :
        ]
        self.text += rest
        self._prefix = self._read = len(self.ids)
        return self.text

    def send(self, upto: int) -> str:
        """The text from `sent` to `upto` (nothing if `upto` is not past it)."""
        new = self.text[self.sent : max(upto, self.sent)]
        self.sent += len(new)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _start_manager(
    model: Any, eos_ids: list[int], device: str, max_batch: int, max_seq_tokens: int
) -> Any:
    # Sampling on, with a non-default temperature and top_p: only then does transformers create
    # the per-request temperature and top_p processors (the values here are never used: every
    # request brings its own).
    generation = GenerationConfig(
        do_sample=True,
        temperature=0.5,
        top_p=0.5,
        top_k=0,
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0] if eos_ids else 0,
    )
    if device == "cpu":
        # transformers sizes the cache from a share of the host's memory, which on a pod is the
        # node's, not the pod's limit: size it from the deployment's limits instead.
        blocks = max_batch * (math.ceil(max_seq_tokens / PAGE_TOKENS) + 1)
        config = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS,
            num_blocks=blocks,
            max_batch_tokens=1024,
            max_requests_per_batch=max_batch,
            per_request_processors=True,
        )
    else:
        config = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS, max_requests_per_batch=max_batch, per_request_processors=True
        )
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=config
    )
    _exact_greedy_and_cheap_top_p(manager)
    # transformers starts its generation thread as a non-daemon thread, which would keep the
    # process from ever exiting; a thread is a daemon when the thread creating it is one.
    starter = threading.Thread(target=manager.start, name="llmray-start", daemon=True)
    starter.start()
    starter.join()
    return manager


def _exact_greedy_and_cheap_top_p(manager: Any) -> None:
    """Swap transformers' per-request temperature and top_p processors for ones where
    temperature 0 means greedy (argmax, exactly) and top_p 1 skips the vocabulary sort."""
    processors = manager.logit_processor.logits_processor
    swapped = 0
    for p in processors:
        for base, ours in ((_Temperature, _GreedyAtZero), (_TopP, _TopPUnlessOne)):
            if type(p) is base:
                p.__class__ = ours  # same state, our __call__
                swapped += 1
    if swapped != 2:  # a transformers upgrade changed its processors: fail loudly, not subtly
        raise RuntimeError(f"expected transformers' temperature and top_p processors: {processors}")


class _GreedyAtZero(_Temperature):
    """Temperature per row; a row at temperature 0 keeps only its argmax (sampling it is exact)."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temps = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        greedy = (temps <= 0).unsqueeze(-1)
        best = scores.argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(scores, float("-inf")).scatter(1, best, 0.0)
        if bool(greedy.all()):  # the common all-greedy batch: no scaling at all
            return onehot
        return torch.where(greedy, onehot, scores / temps.clamp(min=1e-5).unsqueeze(-1))


class _TopPUnlessOne(_TopP):
    """top_p per row, skipping the vocabulary sort when no row of the batch needs it."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if bool((tensor_arg[: scores.size(0)].view(dtype=torch.float32) >= 1).all()):
            return scores
        return super().__call__(scores, tensor_arg)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that a stop string starts with."""
    return max(
        (n for stop in stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
        default=0,
    )


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _fast_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())
