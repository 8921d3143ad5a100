"""Batch inference throughput: `llmray batch`'s pipeline (Ray Data, 2 generator actors) vs a
plain loop of batched `generate` calls over the same prompts, model and batch size.

Same total threads: llmray runs `workers` actors with one thread each; the references are
one plain loop with all the cores, and `workers` single-thread plain loops at once in separate
processes (the actors' layout without Ray Data: the per-core reference).

Each `run_batch` call starts a fresh actor pool (actor start, model load: a fixed cost of
several seconds). Two sizes separate that cost from the steady-state rate: llmray's steady
rate is (tokens(large) - tokens(small)) / (wall(large) - wall(small)), and the fixed cost is
what the small run took beyond its tokens at that rate. Ray start is excluded.

    python benchmarks/batch_inference.py                     # 64 and 256 prompts
    python benchmarks/batch_inference.py --prompts 64 --large 512 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plain_loop(
    model_dir: Path,
    records: list[dict],
    batch: int,
    new_tokens: int,
    threads: int,
    start_at: float = 0.0,
) -> tuple[int, float]:
    """(generated tokens, seconds) of a plain loop: render, left-pad, greedy generate, batch
    by batch (model load excluded; timing starts at `start_at`, a time.time(), if later)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_trainer.batch import prompt_messages

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            prompt_messages(r, "instruction")[0], tokenize=False, add_generation_prompt=True
        )
        for r in records
    ]
    time.sleep(max(0.0, start_at - time.time()))
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
    return tokens, time.perf_counter() - start


def plain_processes(model_dir: Path, records: list[dict], args) -> float:
    """Generated tokens/s of `workers` plain loops at once, one thread and one share of the
    records each: the same process layout as llmray's actors, without Ray Data."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [records[i :: args.workers] for i in range(args.workers)]
    start_at = time.time() + 20  # after every process has imported and loaded the model
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
        futures = [
            pool.submit(
                plain_loop, model_dir, share, args.batch_size, args.max_new_tokens, 1, start_at
            )
            for share in shares
        ]
        results = [f.result() for f in futures]
    return sum(t for t, _ in results) / max(s for _, s in results)


def llmray_batch(
    model_dir: Path, records, batch: int, new_tokens: int, workers: int
) -> tuple[int, float]:
    """(generated tokens, wall seconds) of one `run_batch` call on a fresh actor pool."""
    from llmray.localray import ensure_ray
    from llmray_trainer.batch import Generation, ModelSource, run_batch

    ensure_ray()
    source = ModelSource(uri=str(model_dir), base_dir="/", cache_dir=tempfile.mkdtemp())
    cpus = max(1, (os.cpu_count() or 1) // workers)
    gen = Generation(max_new_tokens=new_tokens)
    start = time.perf_counter()
    rows = run_batch(records, source, gen, workers=workers, batch_size=batch, cpus_per_worker=cpus)
    wall = time.perf_counter() - start
    return sum(r["outputTokens"] for r in rows), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64, help="the small run")
    parser.add_argument("--large", type=int, default=256, help="the large run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llmray.localray import ensure_ray
    from llmray_trainer.tiny_model import create_tiny_model

    model_dir = create_tiny_model(
        Path(tempfile.mkdtemp()) / "model", hidden_size=args.hidden, layers=args.layers
    )
    lines = (REPO / "examples" / "data" / "instruction.jsonl").read_text().splitlines()
    pool = [json.loads(line) for line in lines]
    sizes = (args.prompts, args.large)
    runs = {}
    cores = os.cpu_count() or 1
    ensure_ray()
    # A throwaway pool first: Ray's worker processes and imports warm, as on a used cluster.
    llmray_batch(model_dir, pool[:2], args.batch_size, args.max_new_tokens, args.workers)
    for n in sizes:
        records = [pool[i % len(pool)] for i in range(n)]
        plain = plain_loop(model_dir, records, args.batch_size, args.max_new_tokens, cores)
        ours = llmray_batch(model_dir, records, args.batch_size, args.max_new_tokens, args.workers)
        runs[n] = plain, ours
    per_process = plain_processes(model_dir, records, args)
    load = os.getloadavg()[0]
    print(f"model: random Llama hidden {args.hidden}, {args.layers} layers; {cores} cores")
    print(f"batch {args.batch_size}, {args.max_new_tokens} new tokens; load average {load:.1f}")
    print()
    print("| prompts | plain loop tokens/s | llmray batch tokens/s (whole call) | llmray wall |")
    print("|---:|---:|---:|---:|")
    for n, ((pt, ps), (lt, lw)) in runs.items():
        print(f"| {n} | {pt / ps:.0f} | {lt / lw:.0f} | {lw:.1f} s |")
    (_, (small_t, small_w)), (plain_large, (large_t, large_w)) = runs[sizes[0]], runs[sizes[1]]
    steady = (large_t - small_t) / (large_w - small_w)
    fixed = small_w - small_t / steady
    plain = plain_large[0] / plain_large[1]
    print()
    print(f"llmray steady state: {steady:.0f} tokens/s; fixed cost per call {fixed:.1f} s")
    print(
        f"steady state against the plain loop ({sizes[1]} prompts, {cores} threads): "
        f"{steady / plain:.2f}x"
    )
    print(
        f"against {args.workers} plain loops at once (1 thread each, a share of the "
        f"{sizes[1]} prompts each): {per_process:.0f} tokens/s, {steady / per_process:.2f}x"
    )


if __name__ == "__main__":
    main()
