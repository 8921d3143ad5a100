"""Serving load: llmray's Ray Serve app vs a naive server and `transformers serve`.

For each concurrency level, `--requests` chat completions (greedy, `--max-tokens` each) are sent
by that many client threads with the official `openai` client; reported: generated tokens/s,
p50 / p99 latency, p50 time to first token (streamed requests), and the p50 latency of a
one-token completion with the part of it spent outside llmray's replica (HTTP + Ray Serve's
HAProxy ingress: the client's latency minus the replica's `openai-processing-ms`).

    python benchmarks/serve_load.py                       # tiny model, updates BENCHMARKS.md
    python benchmarks/serve_load.py --model models/smollm2-135m-instruct --no-write
    python benchmarks/serve_load.py --model ... --dtype float32 --peers none --levels 1,16

`--dtype` is llmray's spec.dtype (the peers stay float32); `--peers none` runs llmray alone.

The naive baseline is FastAPI + uvicorn in one process, a lock around `model.generate`: what a
hand-rolled server does, and what the 2x goal is measured against. The second baseline is
`transformers serve --continuous-batching` (transformers' own OpenAI server, one process, the
same continuous batching manager llmray's engine uses, without Ray).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"Tell me a short fact about the number {i}." for i in range(64)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naive_server(model_dir: Path, port: int) -> None:
    """One `generate` at a time, each request alone: the baseline."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with lock, torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=body.get("max_tokens", 16),
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {
                        "role": "assistant",
                        "content": tok.decode(new, skip_special_tokens=True),
                    },
                }
            ],
            "usage": {
                "prompt_tokens": ids["input_ids"].shape[1],
                "completion_tokens": len(new),
                "total_tokens": ids["input_ids"].shape[1] + len(new),
            },
        }

    threading.Thread(
        target=uvicorn.run,
        args=(app,),
        kwargs={"host": "127.0.0.1", "port": port, "log_level": "warning"},
        daemon=True,
    ).start()


def transformers_serve(model_dir: Path, port: int) -> subprocess.Popen:
    """`transformers serve` pinned to the model (requests must name it by its path)."""
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("transformers")),
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--continuous-batching",
            "--cb-num-blocks",
            "160",  # the KV cache llmray's engine has here: 16 requests of 2304 tokens
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("transformers serve did not start")


def one_token(base_url: str, model: str, n: int = 20) -> tuple[float, float | None]:
    """p50 latency of a one-token chat completion, and p50 of the server's own time for it."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    latencies, inside = [], []
    for _ in range(n + 1):
        start = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=1, temperature=0
        )
        latencies.append(time.perf_counter() - start)
        if "openai-processing-ms" in raw.headers:
            inside.append(float(raw.headers["openai-processing-ms"]) / 1e3)
    latencies, inside = latencies[1:], inside[1:]  # the first one warms up
    return statistics.median(latencies), statistics.median(inside) if inside else None


def load(
    base_url: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    stream: bool = False,
) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        if stream:
            first, tokens = None, 0
            for chunk in client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            ):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return time.perf_counter() - start, first or 0.0, tokens
        done = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )
        return time.perf_counter() - start, 0.0, done.usage.completion_tokens

    one(0)  # warm-up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "ttft_p50_s": statistics.median(r[1] for r in results) if stream else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model folder (default: a fresh tiny model)")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="llmray's spec.dtype")
    parser.add_argument(
        "--peers", default="naive,transformers-serve", help="comma-separated, or none"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    peers = set(args.peers.split(",")) - {"none", ""}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.model:
        model_dir, label = Path(args.model).resolve(), Path(args.model).name
    else:
        from llmray_trainer.tiny_model import create_tiny_model

        model_dir = create_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
        label = "tiny (656k parameters)"

    from llmray.serve_args import ServeArgs
    from llmray_serve.local import start

    levels = [int(x) for x in args.levels.split(",")]
    llmray_url = start(
        ServeArgs(
            name="bench",
            model_uri=str(model_dir),
            served_name="m",
            max_new_tokens=max(256, args.max_tokens),
            max_ongoing_requests=max(levels) * 2,
            num_cpus=0,
            dtype=args.dtype,
        ),
        free_port(),
    )
    import openai

    served = openai.OpenAI(base_url=llmray_url, api_key="unused").models.list().data[0]
    precision = f"{served.dtype}, quantization {served.quantization}"
    if args.dtype != "auto":
        label += f" ({precision})"
    naive_url = ts_url = ts = None
    if "naive" in peers:
        naive_port = free_port()
        naive_server(model_dir, naive_port)
        naive_url = f"http://127.0.0.1:{naive_port}/v1"
    if "transformers-serve" in peers:
        ts_port = free_port()
        ts = transformers_serve(model_dir, ts_port)
        ts_url, ts_model = f"http://127.0.0.1:{ts_port}/v1", str(model_dir)
    time.sleep(3)

    skipped = {"tokens_per_s": float("nan"), "p50_s": float("nan"), "p99_s": float("nan")}
    rows = []
    for c in levels:
        ours = load(llmray_url, "m", c, args.requests, args.max_tokens)
        base = load(naive_url, "m", c, args.requests, args.max_tokens) if naive_url else skipped
        hf = load(ts_url, ts_model, c, args.requests, args.max_tokens) if ts_url else skipped
        streamed = load(llmray_url, "m", c, max(c, args.requests // 2), args.max_tokens, True)
        rows.append(
            f"| {c} | {ours['tokens_per_s']:.0f} | {base['tokens_per_s']:.0f} | "
            f"{hf['tokens_per_s']:.0f} | "
            f"{ours['tokens_per_s'] / base['tokens_per_s']:.1f}x | "
            f"{ours['p50_s'] * 1000:.0f} / {ours['p99_s'] * 1000:.0f} | "
            f"{base['p50_s'] * 1000:.0f} / {base['p99_s'] * 1000:.0f} | "
            f"{hf['p50_s'] * 1000:.0f} / {hf['p99_s'] * 1000:.0f} | "
            f"{streamed['ttft_p50_s'] * 1000:.0f} |"
        )
    ours_one, inside_one = one_token(llmray_url, "m")
    naive_one = one_token(naive_url, "m")[0] if naive_url else float("nan")
    hf_one = one_token(ts_url, ts_model)[0] if ts_url else float("nan")
    if ts is not None:
        ts.terminate()
    overhead = ours_one - (inside_one or 0.0)
    report = "\n".join(
        [
            f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            "",
            f"Model: {label}; {args.requests} chat completions per level, greedy, max_tokens "
            f"{args.max_tokens}; {os.cpu_count()} cores. llmray: Ray Serve app, transformers "
            f"engine (continuous batching), {precision}; naive: FastAPI + one `generate` per "
            "request; "
            "transformers serve: `--continuous-batching`, one process, no Ray.",
            "",
            "| concurrency | llmray tokens/s | naive tokens/s | transformers serve tokens/s "
            "| llmray / naive | llmray p50 / p99 ms | naive p50 / p99 ms "
            "| transformers serve p50 / p99 ms | llmray TTFT p50 ms (stream) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"One-token completion, p50: llmray {ours_one * 1000:.0f} ms, of which "
            f"{overhead * 1000:.1f} ms outside the replica (HTTP + Ray Serve's HAProxy ingress: "
            "the client's latency minus the replica's `openai-processing-ms`); naive "
            f"{naive_one * 1000:.0f} ms, transformers serve {hf_one * 1000:.0f} ms.",
        ]
    )
    print(report)
    if not args.no_write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from train_throughput import write_block

        write_block(
            report,
            key="serve_load"
            + ("" if not args.model else "-" + Path(args.model).name)
            + ("" if args.dtype == "auto" else f"-{args.dtype}"),
            title=f"Serving load: {label}",
        )
    from ray import serve

    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
