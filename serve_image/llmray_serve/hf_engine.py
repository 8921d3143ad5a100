"""The transformers engine: continuous batching on CPU or CUDA, with transformers' own manager.

transformers' `ContinuousBatchingManager` (the engine behind `transformers serve
--continuous-batching`) runs one generation thread over a paged KV cache: a request joins the
running batch between two decode steps and leaves it as soon as it is done, so concurrent
requests share every forward pass and a short answer never waits for a long one. Prompts that
share a prefix (a system prompt) share its cache blocks.

This module adds what an OpenAI server needs on top: per-request temperature (0 is exact
greedy) and top_p, stop strings, incremental UTF-8-safe text, cancellation when a client
leaves, an in-flight limit (503 beyond it), and a KV cache sized from the deployment's limits
rather than from the host's memory (on a pod, the host's memory is not the pod's). Grammars,
logit_bias, penalties and logprobs are per-request logits work (hf_logits.py); `n` choices
are transformers' forked children of one request, which share its prompt's KV cache blocks;
the prompt's logprobs (echo) come from one plain forward pass over it.

    engine = TransformersEngine("models/tiny", max_ongoing=16)
    async for chunk in engine.generate("Hello", SamplingParams(16, 0.0, 1.0)): ...
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from llmray import omp_pools
from llmray.api.llmdeployment import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS
from llmray.precision import DTYPE_DEFAULT, QUANTIZATION_DEFAULT
from llmray_serve import hf_logits
from llmray_serve.engine import (
    Chunk,
    EngineOverloaded,
    EngineUnavailable,
    InvalidParameter,
    SamplingParams,
    TokenLogprob,
)
from llmray_serve.hf_lora import MixedLoRA
from llmray_serve.hf_model import load_model
from llmray_serve.hf_steps import GuardedSteps
from llmray_serve.prompts import TokenizerPrompts, load_tokenizer

log = logging.getLogger(__name__)

# Tokens per KV cache block. A request reuses the blocks of an earlier prompt it starts with,
# whole blocks only: at transformers' default 256, a 475-token tools prompt shared 256 tokens
# and each request prefilled the other 219 again; at 32 it prefills under 32. Decode is no
# slower (BENCHMARKS.md, "Constrained decoding").
PAGE_TOKENS = 32
# A generation step (one forward pass of at most 1024 tokens) that runs longer than this is
# stuck: seconds on a 135M model on 2 cores, far less on a GPU, minutes only if wedged.
STUCK_AFTER_S = 120.0
# The warm-up compiles the one-token step with compileDecode: ~1 minute for SmolLM2-135M on
# 2 cores, more for a larger model (its weights are packed while compiling).
COMPILE_WITHIN_S = 1800.0
PROMPT_LOGITS_ROWS = 256  # prompt positions per lm-head call when scoring a prompt (echo)
COMPILED_GRAMMARS = 64  # the grammars most recently used, kept compiled


class TransformersEngine(TokenizerPrompts):
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        ipex: bool = False,
        dtype: str = DTYPE_DEFAULT,
        quantization: str = QUANTIZATION_DEFAULT,
        max_batch: int = 16,
        max_ongoing: int = 64,
        max_seq_tokens: int = MAX_PROMPT_TOKENS + MAX_NEW_TOKENS,
        stuck_after_s: float = STUCK_AFTER_S,
        adapters: bool = False,
        compile_decode: bool = False,
    ) -> None:
        """`max_batch` requests decode together; `max_seq_tokens` is a prompt plus its answer
        at most (maxPromptTokens + maxNewTokens): the KV cache holds `max_batch` of them.
        A generation step running longer than `stuck_after_s` makes the engine unhealthy.
        `dtype`: spec.dtype; `quantization`: "int8" for the experimental dynamic int8
        (hf_model.py, not a spec field); the precision it runs in is `self.precision`.
        `adapters`: serve LoRA adapters (hf_lora.py), mixed in one batch with the base.
        `compile_decode`: spec.compileDecode (hf_compiled.py; not with adapters, whose
        layers stay unfused); the warm-up then compiles the one-token step."""
        self.tokenizer = load_tokenizer(model_dir)
        model, self.precision = load_model(
            model_dir,
            device=device,
            dtype=dtype,
            quantization=quantization,
            ipex=ipex,
            packed_batch=max_batch,
            fuse=not adapters,
            compile_decode=compile_decode,
        )
        # The one-token step compiled (hf_compiled.CompiledDecode), or None.
        self.compiled = getattr(model.forward, "compiled", None)
        self.model, self.device = model, device
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.max_batch, self.max_ongoing = max_batch, max_ongoing
        self._ongoing = 0
        self._ids = itertools.count()
        # Forward passes so far: with batching, far fewer than the tokens generated; and the
        # tokens they ran: a prompt whose start is cached runs only the rest.
        self.forward_passes = self.forward_tokens = 0
        model.register_forward_hook(self._count_forward, with_kwargs=True)
        self.lora = MixedLoRA(model) if adapters else None
        # Work for the generation thread between two steps (loading adapters): (fn, future).
        self._between: collections.deque[tuple[Callable[[], None], Any]] = collections.deque()
        self.steps = GuardedSteps(stuck_after_s, self._between_steps)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.grammar_tokenizer = _grammar_tokenizer(self.tokenizer, vocab, self.eos_ids)
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.manager, self.logits = _start_manager(
            model, self.eos_ids, device, max_batch, max_seq_tokens, self.steps, vocab
        )
        self._score_lock = threading.Lock()
        self._warm_up()
        # Decoding runs on the generation thread from here on: this thread's OpenMP workers
        # would only make libgomp throttle that thread's (omp_pools.py).
        omp_pools.release_thread_pool()

    # --- the Engine interface (count_tokens and render_chat: TokenizerPrompts) ---

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        if trouble := self._trouble():  # transformers would drop the request without a word
            raise EngineUnavailable(trouble)
        n = params.n
        if n > self.max_ongoing:
            raise InvalidParameter(
                "n", f"n: at most {self.max_ongoing} choices per request (maxOngoingRequests)"
            )
        if self._ongoing + n > self.max_ongoing:
            raise EngineOverloaded(f"{self._ongoing} requests ongoing, limit {self.max_ongoing}")
        self.check_logit_bias(params)
        ids = self.prompt_ids(prompt)
        self._ongoing += n  # taken before the awaits below, in which other requests come in
        try:
            matchers = await self._matchers(params.grammar, n)
            scored = None
            if params.prompt_logprobs is not None:
                scored = await asyncio.to_thread(
                    self._score_prompt, ids, params.prompt_logprobs, params.adapter
                )
        except BaseException:
            self._ongoing -= n
            raise
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        request_id = f"llmray-{next(self._ids)}"
        # transformers names the choices it forks from a request so (Manager.update_batch).
        sequences = [request_id] + [f"{request_id}__child#{i}" for i in range(n - 1)]
        if params.seed is not None and self._ongoing == n:
            torch.manual_seed(params.seed)  # reproducible for a request alone in the engine
        finished: set[int] = set()
        try:
            for index, sequence in enumerate(sequences):
                if params.adapter is not None:
                    assert self.lora is not None, "the engine was made without adapters"
                    self.lora.adapter_of[sequence] = params.adapter
                controls = self.logits.controls_for(
                    top=params.logprobs,
                    logit_bias=params.logit_bias,
                    presence=params.presence_penalty,
                    frequency=params.frequency_penalty,
                    matcher=matchers[index] if matchers else None,
                )
                if controls is not None:
                    self.logits.controls[sequence] = controls
                self.manager.register_result_handler(
                    sequence, functools.partial(_tagged, outputs.put_nowait, index)
                )
            if not self._add(ids, sequences, params):  # the loop stopped meanwhile
                raise EngineUnavailable("the generation loop stopped")
            choices = [_Choice(self.tokenizer, sequence) for sequence in sequences]
            while len(finished) < n:
                index, out = await outputs.get()
                if out.error:
                    finished.add(index)
                    raise RuntimeError(f"generation failed: {out.error}")
                choice = choices[index]
                choice.text.extend([t for t in out.generated_tokens if t not in self.eos_ids])
                chunk = self._next_chunk(out, choice.text, len(ids), params)
                chunk.index, chunk.logprobs = index, self._logprobs(choice, out)
                if not choice.started and scored is not None:
                    chunk.prompt_logprobs = scored
                if chunk.finish_reason:
                    finished.add(index)
                    if not out.is_finished():  # cut by a stop string: free its slot now
                        self._cancel(sequences[index])
                    yield chunk
                elif chunk.text or chunk.logprobs or chunk.prompt_logprobs:
                    choice.started = True
                    yield chunk
        finally:
            for index, sequence in enumerate(sequences):
                if index not in finished:  # a client that left: free its batch slot now
                    self._cancel(sequence)
                self.logits.controls.pop(sequence, None)
                if self.lora is not None:
                    self.lora.adapter_of.pop(sequence, None)
            self._ongoing -= n

    def healthy(self) -> bool:
        return self._trouble() is None

    async def load_adapter(self, name: str, path: str) -> None:
        assert self.lora is not None, "the engine was made without adapters"
        await self._on_generation_thread(functools.partial(self.lora.load, name, path))

    async def unload_adapter(self, name: str) -> None:
        assert self.lora is not None, "the engine was made without adapters"
        await self._on_generation_thread(functools.partial(self.lora.unload, name))

    def close(self) -> None:
        """Stop the generation loop (requests still running are failed)."""
        self.manager.stop(block=True, timeout=30, hard_stop=True)

    # --- internals ---

    def _add(self, ids: list[int], sequences: list[str], params: SamplingParams) -> bool:
        """Queue the request's choices. With n > 1 transformers forks the request into n - 1
        more once its prompt is in the cache, all but its last token (the choices share those
        blocks, and each samples from the last token on): add_request takes the count from
        the manager (num_return_sequences, read only there, on this thread). A one-token
        prompt has nothing to share (and transformers cannot fork it): one request each."""
        forked = params.n > 1 and len(ids) > 1
        self.manager.num_return_sequences = params.n if forked else 1
        try:
            for sequence in sequences[:1] if forked else sequences:
                added = self.manager.add_request(
                    ids,
                    request_id=sequence,
                    max_new_tokens=params.max_tokens,
                    # Token by token only where someone reads them: a stream, or stop strings
                    # to look for; a plain request gets its answer once (far less work).
                    streaming=params.stream or bool(params.stop),
                    eos_token_id=self.eos_ids,
                    temperature=float(max(params.temperature, 0.0)),
                    top_p=float(params.top_p) if params.temperature > 0 else 1.0,
                )
                if added is None:
                    return False
            return True
        finally:
            self.manager.num_return_sequences = 1

    async def _matchers(self, grammar: str | None, n: int) -> list[Any] | None:
        """One grammar matcher per choice, or None without a grammar: copies of the grammar's
        compiled matcher (kept for the next requests with the same grammar, as a service's
        clients send the same schema or tools again and again; compiled off the event loop:
        a large schema takes milliseconds)."""
        if grammar is None:
            return None
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = await asyncio.to_thread(self._compile, grammar)
        else:
            self._compiled.move_to_end(grammar)
        return [compiled.deep_copy() for _ in range(n)]

    def _compile(self, grammar: str) -> Any:
        import llguidance

        matcher = llguidance.LLMatcher(self.grammar_tokenizer, grammar)
        if matcher.is_error():
            raise InvalidParameter("response_format", f"grammar error: {matcher.get_error()}")
        matcher.compute_bitmask()  # builds the first token's lexer states, for its copies too
        self._compiled[grammar] = matcher
        while len(self._compiled) > COMPILED_GRAMMARS:
            self._compiled.popitem(last=False)
        return matcher

    def _logprobs(self, choice: _Choice, out: Any) -> tuple[TokenLogprob, ...]:
        """The logprobs of the choice's tokens since its last chunk (end tokens left out, as
        from the text)."""
        controls = self.logits.controls.get(choice.sequence)
        if controls is None or controls.top is None:
            return ()
        tokens = out.generated_tokens
        new = []
        for position in range(choice.logprobs_sent, min(len(tokens), len(controls.recorded))):
            r = controls.recorded[position]
            if r.token in self.eos_ids:
                continue
            top = tuple((self.token_text(t), lp) for t, lp in r.top)
            new.append(TokenLogprob(self.token_text(r.token), r.logprob, top, r.token))
        choice.logprobs_sent = min(len(tokens), len(controls.recorded))
        return tuple(new)

    def _score_prompt(
        self, ids: list[int], top: int, adapter: str | None = None
    ) -> tuple[TokenLogprob, ...]:
        """The prompt's logprobs, from one forward pass outside the batch (transformers' batch
        computes the last position's logits only); on a worker thread, one prompt at a time."""
        with self._score_lock, self._plain_forward(adapter, len(ids)):
            try:
                scored = hf_logits.prompt_logprobs(self.model, ids, top, PROMPT_LOGITS_ROWS)
            finally:
                omp_pools.release_thread_pool()  # a worker thread: see __init__
        return tuple(
            TokenLogprob(
                self.token_text(token),
                logprob,
                tuple((self.token_text(t), v) for t, v in top_),
                token,
            )
            for token, logprob, top_ in scored
        )

    def _plain_forward(self, adapter: str | None, tokens: int) -> Any:
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.plain(adapter, tokens)

    async def _on_generation_thread(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the generation thread between two steps (no forward pass running),
        and wait for it; its exception is raised here."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._between.append((fn, done))
        self.manager._wake_up_loop.set()  # an idle loop waits up to 0.1 s for work otherwise
        await asyncio.wrap_future(done)

    def _between_steps(self, processor: Any) -> None:
        if self.lora is not None:
            self.lora.hook_batches(processor)
        while self._between:
            fn, done = self._between.popleft()
            try:
                with self._score_lock:  # nor a prompt being scored on another thread
                    fn()
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _trouble(self) -> str | None:
        if not self.manager.is_running():
            return "the generation loop has stopped"
        return self.steps.trouble()

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
        timeout = 60 if self.compiled is None else COMPILE_WITHIN_S
        while (out := self.manager.get_result(request_id, timeout=timeout)) is not None:
            if out.is_finished():
                return
        raise RuntimeError("the generation loop did not answer its warm-up request")

    def _count_forward(self, _model: Any, args: tuple, kwargs: dict, _out: Any) -> None:
        self.forward_passes += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:  # transformers packs a step's tokens into one row
            self.forward_tokens += ids.numel()


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


class _Choice:
    """One choice of a request as the engine reads it: its text, logprobs sent, first chunk."""

    def __init__(self, tokenizer: Any, sequence: str) -> None:
        self.text = _Text(tokenizer)
        self.sequence = sequence  # transformers' request id of this choice
        self.logprobs_sent = 0
        self.started = False


def _tagged(put: Any, index: int, out: Any) -> None:
    put((index, out))


def _grammar_tokenizer(tokenizer: Any, vocab: int, eos_ids: list[int]) -> Any:
    """The tokenizer as llguidance sees it, for the model's logits width and end tokens."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos_ids)


def _start_manager(
    model: Any,
    eos_ids: list[int],
    device: str,
    max_batch: int,
    max_seq_tokens: int,
    steps: GuardedSteps,
    vocab: int,
) -> tuple[Any, hf_logits.PerRequestLogits]:
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
        sizes: dict[str, Any] = {"num_blocks": blocks, "max_batch_tokens": 1024}
    else:
        sizes = {}
    config = ContinuousBatchingConfig(
        page_size=PAGE_TOKENS,
        max_requests_per_batch=max_batch,
        per_request_processors=True,
        # Each step's grammar masks and logprobs are computed from the step before it, on
        # the host: no step may be issued ahead (async batching) or replayed from a captured
        # graph (CUDA graphs).
        use_async_batching=False,
        use_cuda_graph=False,
        **sizes,
    )
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=config
    )
    hf_logits.exact_greedy_and_cheap_top_p(manager)
    logits = hf_logits.install(manager, vocab)
    steps.install(manager, logits)
    # transformers starts its generation thread as a non-daemon thread, which would keep the
    # process from ever exiting; a thread is a daemon when the thread creating it is one.
    starter = threading.Thread(target=manager.start, name="llmray-start", daemon=True)
    starter.start()
    starter.join()
    return manager, logits


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
