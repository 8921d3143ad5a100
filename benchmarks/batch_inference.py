"""Batch inference throughput: `llmray batch`'s pipeline (Ray Data, 2 generator actors) vs a
plain loop of batched `generate` calls over the same prompts, model and batch size.

Same total threads: the plain loop is one process with all the cores, llmray runs `workers`
actors with cores/workers threads each. Reported: generated tokens/s of each, the ratio per
core, and llmray's wall time with its actor start and model loads (Ray start excluded).

    python benchmarks/batch_inference.py              # prints the table
    python benchmarks/batch_inference.py --prompts 64 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plain_loop(model_dir: Path, records: list[dict], batch: int, new_tokens: int) -> float:
    """Generated tokens/s of a plain loop: render, left-pad, greedy generate, batch by batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_trainer.batch import prompt_messages

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            prompt_messages(r, "instruction")[0], tokenize=False, add_generation_prompt=True
        )
        for r in records
    ]
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        inputs = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        for ids in out[:, inputs["input_ids"].shape[1] :].tolist():
            eos = tok.eos_token_id
            tokens += next((j + 1 for j, t in enumerate(ids) if t == eos), len(ids))
    return tokens / (time.perf_counter() - start)


def llmray_batch(model_dir: Path, records, batch: int, new_tokens: int, workers: int):
    from llmray.localray import ensure_ray
    from llmray_trainer.batch import Generation, ModelSource, run_batch

    ensure_ray()
    source = ModelSource(uri=str(model_dir), base_dir="/", cache_dir=tempfile.mkdtemp())
    cpus = max(1, (os.cpu_count() or 1) // workers)
    gen = Generation(max_new_tokens=new_tokens)
    # Once to warm up (actor start, model load), then the measured run on a fresh pool.
    run_batch(
        records[:workers], source, gen, workers=workers, batch_size=batch, cpus_per_worker=cpus
    )
    start = time.perf_counter()
    rows = run_batch(records, source, gen, workers=workers, batch_size=batch, cpus_per_worker=cpus)
    wall = time.perf_counter() - start
    return sum(r["outputTokens"] for r in rows) / wall, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llmray_trainer.tiny_model import create_tiny_model

    model_dir = create_tiny_model(
        Path(tempfile.mkdtemp()) / "model", hidden_size=args.hidden, layers=args.layers
    )
    lines = (REPO / "examples" / "data" / "instruction.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[: args.prompts]]
    plain = plain_loop(model_dir, records, args.batch_size, args.max_new_tokens)
    ours, wall = llmray_batch(
        model_dir, records, args.batch_size, args.max_new_tokens, args.workers
    )
    cores = os.cpu_count()
    print(f"model: random Llama hidden {args.hidden}, {args.layers} layers; {cores} cores")
    print(f"{len(records)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens")
    print(f"plain loop (1 process, {cores} threads): {plain:.0f} tokens/s")
    print(
        f"llmray batch ({args.workers} actors): {ours:.0f} tokens/s (wall {wall:.1f} s, "
        "actor start and model load included)"
    )
    print(f"ratio: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
