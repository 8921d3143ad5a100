"""Where a single-stream decode step goes: the transformers engine against a bare eager loop.

One greedy answer at a time (c=1), no Ray, no HTTP. The floor is a bare eager PyTorch loop
(`model(ids, past_key_values=..., use_cache=True)` + argmax) on the same weights; the engine
(serve_image/llmray_serve/hf_engine.py) answers the same chat prompts, plain and streamed,
with its model's forward and transformers' generation-loop body timed (wrapped here, not in
the engine): the loop body minus the forward is the batching manager, the logits processors,
sampling and the per-step bookkeeping; the wall time minus the loop body is what the caller's
side (detokenisation, stop strings, the asyncio queue) adds on top. The rounds alternate.

    python benchmarks/decode_step.py --model models/smollm2-135m-instruct --dtype float32
    py-spy record -r 200 -f raw -o /tmp/engine.txt -- \
        python benchmarks/decode_step.py --model models/smollm2-135m-instruct --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "serve_image"))
from llmray import omp_pools  # noqa: E402

PROMPTS = [f"Tell me a short fact about the number {i}." for i in range(64)]


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eager_loop(model: Any, ids: list[int], tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Greedy tokens, and the seconds the decode steps took (the prompt's forward excluded)."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        new = [nxt]
        start = time.perf_counter()
        while len(new) < tokens and nxt not in eos:
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            new.append(nxt)
        spent = time.perf_counter() - start
    # The engine decodes on its own thread: this thread's OpenMP pool would throttle it.
    omp_pools.release_thread_pool()
    return new, spent


def timed(
    seconds: dict[str, float], name: str, owner: Any, attribute: str, ran: Any = None
) -> None:
    """Add the time each call of owner.attribute takes to seconds[name]; with `ran`, only
    the calls that changed ran() (the loop body's idle waits for work are not steps)."""
    inner = getattr(owner, attribute)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, before = time.perf_counter(), ran() if ran else None
        try:
            return inner(*args, **kwargs)
        finally:
            if ran is None or ran() != before:
                seconds[name] += time.perf_counter() - start

    setattr(owner, attribute, wrapper)


async def engine_answer(engine: Any, ids: list[int], tokens: int, stream: bool) -> tuple[str, int]:
    from llmray_serve.engine import SamplingParams

    text, count = "", 0
    params = SamplingParams(tokens, 0.0, 1.0, stream=stream)
    async for chunk in engine.generate(engine.tokenizer.decode(ids), params):
        text, count = text + chunk.text, chunk.completion_tokens
    return text, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--dtype", default="float32", help="the engine's spec.dtype")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(args.model, dtype=args.dtype, max_ongoing=16)
    model, tokenizer, eos = engine.model, engine.tokenizer, set(engine.eos_ids)
    seconds: dict[str, float] = collections.defaultdict(float)
    timed(seconds, "forward", model, "forward")
    manager = engine.manager
    timed(seconds, "loop", manager, "_generation_loop_body", lambda: manager.current_batch)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS[: args.prompts]]
    print(
        f"{engine.precision.dtype}, torch threads {torch.get_num_threads()}, "
        f"{len(prompts)} prompts, {args.max_tokens} new tokens, greedy"
    )
    eager_loop(model, prompts[0], 4, eos)  # warm-up
    for _ in range(args.rounds):
        steps, eager_texts = [], []
        for ids in prompts:
            new, spent = eager_loop(model, ids, args.max_tokens, eos)
            eager_texts.append(tokenizer.decode([t for t in new if t not in eos]))
            steps.append(spent / max(1, len(new) - 1))
        print(f"eager loop: {statistics.median(steps) * 1000:.1f} ms per decode step")
        for stream in (False, True):
            seconds.clear()
            start, tokens, texts = time.perf_counter(), 0, []
            for ids in prompts:
                text, count = asyncio.run(engine_answer(engine, ids, args.max_tokens, stream))
                texts.append(text)
                tokens += count
            wall = time.perf_counter() - start
            same = sum(a == b for a, b in zip(texts, eager_texts, strict=True))
            forward, loop = seconds["forward"], seconds["loop"]
            print(
                f"engine ({'stream' if stream else 'plain'}): {wall / tokens * 1000:.1f} ms per "
                f"token (prefill included): forward {forward / tokens * 1000:.1f}, rest of the "
                f"loop body {(loop - forward) / tokens * 1000:.1f}, outside the loop "
                f"{(wall - loop) / tokens * 1000:.1f}; text equal to the eager loop's on "
                f"{same} / {len(prompts)}"
            )
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
