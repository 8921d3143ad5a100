"""Serving precision: quality of bfloat16 and int8 against float32, in the engine's own loader.

For each precision, the model as the transformers engine loads it (`llmray_serve.hf_model`):
perplexity on a held-out set (the answers of examples/data/instruction_eval.jsonl, chat
template applied, every token scored), and the greedy answers to serve_load.py's first 16
benchmark prompts (32 tokens, through the engine's continuous batching, all 16 at once),
counted equal to float32's or not; and the engine's own tokens/s (no Ray, no HTTP) on
them: 4 answers one at a time (c=1), the 16 at once (c=16).

    python benchmarks/serve_precision.py --model /tmp/models/smollm2     # updates BENCHMARKS.md
    python benchmarks/serve_precision.py --variants float32,int8 --no-write

Speed is serve_load.py's (`--dtype`, `--quantization`): the whole server under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = REPO / "examples" / "data" / "instruction_eval.jsonl"
VARIANTS = {  # name -> (spec.dtype, spec.quantization)
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8": ("auto", "int8"),
}


def held_out_texts(tokenizer) -> list[str]:
    texts = []
    for line in HELD_OUT.read_text().splitlines():
        r = json.loads(line)
        user = r["instruction"] + (f"\n\n{r['context']}" if r.get("context") else "")
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": r["response"]}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
    return texts


def perplexity(model, tokenizer, texts: list[str]) -> float:
    import torch

    nll = tokens = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            loss = model(ids, labels=ids).loss.float().item()
            nll += loss * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


async def greedy_answers(
    engine, prompts: list[str], max_tokens: int, concurrency: int
) -> tuple[list[str], float]:
    """The greedy answers, `concurrency` prompts at a time, and the tokens/s they took."""
    from llmray_serve.engine import SamplingParams, collect

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, stream=False)
    rendered = [engine.render_chat([{"role": "user", "content": p}]) for p in prompts]
    await collect(engine.generate(rendered[0], params))  # warm-up
    done = []
    start = time.perf_counter()
    for i in range(0, len(rendered), concurrency):
        batch = rendered[i : i + concurrency]
        done += await asyncio.gather(*(collect(engine.generate(p, params)) for p in batch))
    tokens = sum(d.usage.completion_tokens for d in done)
    return [d.text for d in done], tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--variants", default="float32,bfloat16,int8")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_load import PROMPTS

    from llmray.precision import cpu_bf16_flags, read_cpu_flags
    from llmray_serve.hf_engine import TransformersEngine

    prompts = PROMPTS[: args.prompts]
    rows, reference = [], None
    for name in args.variants.split(","):
        dtype, quantization = VARIANTS[name]
        engine = TransformersEngine(args.model, dtype=dtype, quantization=quantization)
        try:
            ppl = perplexity(engine.model, engine.tokenizer, held_out_texts(engine.tokenizer))
            answers, fast = asyncio.run(greedy_answers(engine, prompts, args.max_tokens, 16))
            _, slow = asyncio.run(greedy_answers(engine, prompts[:4], args.max_tokens, 1))
        finally:
            engine.close()
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        rows.append(
            f"| {name} | {engine.precision.dtype} | {ppl:.2f} | {same} / {len(prompts)} "
            f"| {slow:.1f} | {fast:.1f} | {answers[3][:60]!r} |"
        )
        print(rows[-1], flush=True)
    label = Path(args.model).name
    flags = ", ".join(cpu_bf16_flags(read_cpu_flags())) or "none"
    report = "\n".join(
        [
            f"`python benchmarks/serve_precision.py {' '.join(sys.argv[1:])}`",
            "",
            f"Model: {label}; {os.cpu_count()} cores, CPU bf16 flags: {flags}. Perplexity: "
            f"{HELD_OUT.relative_to(REPO)} (chat template, every token); greedy: the first "
            f"{len(prompts)} serve_load.py prompts, {args.max_tokens} tokens, equal to "
            f"{args.variants.split(',')[0]}'s. Engine tokens/s: the transformers engine alone "
            "(no Ray, no HTTP), 4 answers one at a time (c=1), the 16 at once (c=16).",
            "",
            "| variant | runs in | held-out perplexity | greedy answers equal "
            "| engine tokens/s c=1 | c=16 | prompt 3's answer |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
        ]
    )
    print(report)
    if not args.no_write:
        from train_throughput import write_block

        write_block(report, key=f"serve_precision-{label}", title=f"Serving precision: {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
