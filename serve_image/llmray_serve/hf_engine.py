"""The transformers engine: concurrent requests share batched forward passes (CPU or CUDA).

One generation thread runs waves: it takes every waiting request (up to `max_batch`), left-pads
their prompts into one batch and runs a single `model.generate` for all of them. Per request:
its own temperature / top_p (a per-row logits processor; temperature 0 is greedy), its own
max_tokens, eos and stop strings (a per-row stopping criterion: a finished or cancelled row
stops costing anything once every row of the wave is done), its own stream of text chunks.
Requests that arrive during a wave join the next one (static batching per wave; continuous
batching, joining between decode steps, is the vLLM engine's job on GPUs).

    engine = TransformersEngine("models/tiny", max_ongoing=16)
    async for chunk in engine.generate("Hello", SamplingParams(16, 0.0, 1.0)): ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmray.chat import DEFAULT_CHAT_TEMPLATE
from llmray_serve.engine import Chunk, EngineOverloaded, SamplingParams

log = logging.getLogger(__name__)

IPEX_HELP = (
    "compute.ipex: true needs Intel Extension for PyTorch 2.8, which requires torch 2.8.* "
    "(see docs/ipex.md)"
)


@dataclass
class _Request:
    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False

    def emit(self, chunk: Chunk) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)


class TransformersEngine:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        ipex: bool = False,
        max_batch: int = 16,
        max_ongoing: int = 64,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if _fast_bf16(device) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        if ipex:
            try:
                import intel_extension_for_pytorch as ipex_mod  # type: ignore[import-not-found]
            except ImportError as exc:
                raise RuntimeError(f"{IPEX_HELP}; import failed: {exc}") from exc
            model = ipex_mod.optimize(model, dtype=dtype)
        self.model, self.device = model, device
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.max_batch, self.max_ongoing = max_batch, max_ongoing
        self._ongoing = 0
        self.waves = 0  # batched generate calls so far (requests per wave = sharing)
        self._waiting: list[_Request] = []
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="llmray-generate", daemon=True)
        self._thread.start()

    # --- the Engine interface ---

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        if self._ongoing >= self.max_ongoing:
            raise EngineOverloaded(f"{self._ongoing} requests ongoing, limit {self.max_ongoing}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        request = _Request(ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self._ongoing += 1
        try:
            with self._wake:
                self._waiting.append(request)
                self._wake.notify()
            while True:
                chunk = await request.queue.get()
                yield chunk
                if chunk.finish_reason:
                    return
        finally:
            request.cancelled.set()  # a client that left: its row stops in the running wave
            self._ongoing -= 1

    # --- the generation thread ---

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting:
                    self._wake.wait()
                wave = [r for r in self._waiting[: self.max_batch] if not r.cancelled.is_set()]
                del self._waiting[: self.max_batch]
            if wave:
                self.waves += 1
                try:
                    self._generate_wave(wave)
                except Exception as exc:  # one bad wave must not kill the replica
                    log.exception("generation failed")
                    for r in wave:
                        if not r.done:
                            r.done = True
                            r.emit(
                                Chunk(
                                    f"[generation failed: {exc}]",
                                    len(r.ids),
                                    len(r.generated),
                                    "stop",
                                )
                            )

    def _generate_wave(self, wave: list[_Request]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        batch = self.tokenizer.pad({"input_ids": [r.ids for r in wave]}, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        seeds = {r.params.seed for r in wave}
        if len(wave) == 1 and None not in seeds:
            torch.manual_seed(seeds.pop())  # reproducible for a request alone in its wave
        config = GenerationConfig(
            max_new_tokens=max(r.params.max_tokens for r in wave),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        with torch.inference_mode():
            self.model.generate(
                **batch,
                generation_config=config,
                logits_processor=LogitsProcessorList([_PerRowSampling(wave, self.device)]),
                stopping_criteria=StoppingCriteriaList([_RowsDone(wave)]),
                streamer=_WaveStreamer(self, wave),
            )
        for r in wave:  # e.g. every row ended on eos in the same step
            if not r.done:
                self._finish(r, "stop")

    def _on_token(self, r: _Request, token: int) -> None:
        if r.done:
            return
        if r.cancelled.is_set():
            r.done = True
            return
        if token in self.eos_ids:
            self._finish(r, "stop")
            return
        r.generated.append(token)
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            new = ""
        else:
            new, r.text = text[len(r.text) :], text
        for stop in r.params.stop:
            at = r.text.find(stop)
            if at != -1:
                new = new[: max(0, len(new) - (len(r.text) - at))]
                self._finish(r, "stop", new)
                return
        if len(r.generated) >= r.params.max_tokens:
            self._finish(r, "length", new)
        elif new:
            r.emit(Chunk(new, len(r.ids), len(r.generated)))

    def _finish(self, r: _Request, reason: str, text: str = "") -> None:
        r.done = True
        r.emit(Chunk(text, len(r.ids), len(r.generated), reason))


class _WaveStreamer:
    """transformers streamer: each `put` is the next token of every row of the wave."""

    def __init__(self, engine: TransformersEngine, wave: list[_Request]) -> None:
        self.engine, self.wave, self.prompt_seen = engine, wave, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first puts the prompt ids
            self.prompt_seen = True
            return
        for r, token in zip(self.wave, value.reshape(-1).tolist(), strict=True):
            self.engine._on_token(r, token)

    def end(self) -> None:
        pass


class _RowsDone:
    """Stopping criterion: a row is done once finished or cancelled (all done: wave ends)."""

    def __init__(self, wave: list[_Request]) -> None:
        self.wave = wave

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor(
            [r.done or r.cancelled.is_set() for r in self.wave], device=input_ids.device
        )


class _PerRowSampling:
    """Per-request temperature and top_p on one batch; temperature 0 keeps only the argmax."""

    def __init__(self, wave: list[_Request], device: str) -> None:
        import torch

        self.temps = torch.tensor([r.params.temperature for r in wave], device=device)
        self.top_ps = torch.tensor([r.params.top_p for r in wave], device=device)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float()
        greedy = self.temps <= 0
        best = scores.argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(scores, float("-inf")).scatter(1, best, 0.0)
        if bool(greedy.all()):  # the common greedy wave: no scaling, no vocabulary sort
            return onehot
        scaled = scores / self.temps.clamp(min=1e-5).unsqueeze(1)
        if bool((self.top_ps < 1).any()):
            ordered, index = scaled.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # Drop tokens once the mass before them reaches top_p (the first always stays).
            drop = (probs.cumsum(dim=-1) - probs) >= self.top_ps.unsqueeze(1)
            ordered = ordered.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(1, index, ordered)
        return torch.where(greedy.unsqueeze(1), onehot, scaled)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _fast_bf16(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())
