"""Serving load: llmray's Ray Serve app vs a naive server and `transformers serve`.

For each concurrency level, `--requests` chat completions (greedy, `--max-tokens` each) are sent
by that many client threads with the official `openai` client; reported: generated tokens/s,
p50 / p99 latency, p50 time to first token (streamed requests), and the p50 latency of a
one-token completion with the part of it spent outside llmray's replica (HTTP + Ray Serve's
HAProxy ingress: the client's latency minus the replica's `openai-processing-ms`).

    python benchmarks/serve_load.py                       # tiny model, updates BENCHMARKS.md
    python benchmarks/serve_load.py --model models/smollm2-135m-instruct --no-write
    python benchmarks/serve_load.py --adapters 4           # one deployment, 4 LoRA adapters
    python benchmarks/serve_load.py --model ... --dtype float32 --peers none --levels 1,16

    python benchmarks/serve_load.py --model ... --dtype float32 --peers llamacpp --gguf F.gguf
    python benchmarks/serve_load.py --model ... --dtype float32 --compile-decode --peers none

`--dtype` is llmray's spec.dtype (the peers stay float32); `--peers none` runs llmray alone;
`llamacpp` adds llama.cpp's `llama-server` (how to build it: benchmarks/llamacpp_peer.py),
skipped with a note when it is not installed.

The naive baseline is FastAPI + uvicorn in one process, a lock around `model.generate`: what a
hand-rolled server does, and what the 2x goal is measured against. The second baseline is
`transformers serve --continuous-batching` (transformers' own OpenAI server, one process, the
same continuous batching manager llmray's engine uses, without Ray).

With `--adapters N`: N random LoRA adapters (rank 8, every linear layer) on the model in one
deployment, the load spread over them (request i asks adapter i mod N), against the same load
on one adapter merged into a whole model and served alone; and each adapter's first request
(which loads it into the replica) against a warm one.
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
from collections.abc import Callable, Iterable
from pathlib import Path

from llmray.localray import free_port

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"Tell me a short fact about the number {i}." for i in range(64)]


PEER_NOTES = {
    "naive": "FastAPI + one `generate` per request",
    "transformers serve": "`--continuous-batching`, one process, no Ray",
}


def command_line(script: str) -> str:
    """The command that ran this benchmark, as BENCHMARKS.md quotes it."""
    args = " ".join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]])
    return f"`{args}`"


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
    results, wall = run_concurrently(one, concurrency, requests)
    return {
        "tokens_per_s": sum(r[2] for r in results) / wall,
        **latency_percentiles(r[0] for r in results),
        "ttft_p50_s": statistics.median(r[1] for r in results) if stream else None,
    }


def run_concurrently(
    one: Callable[[int], tuple], concurrency: int, requests: int
) -> tuple[list[tuple], float]:
    """`one(i)` for each of `requests` on `concurrency` client threads: the results in order
    and the wall time in seconds."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    return results, time.perf_counter() - start


def latency_percentiles(latencies: Iterable[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model folder (default: a fresh tiny model)")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="llmray's spec.dtype")
    parser.add_argument(
        "--compile-decode", action="store_true", help="llmray's spec.compileDecode: true"
    )
    parser.add_argument(
        "--peers",
        default="naive,transformers-serve",
        help="comma-separated from naive, transformers-serve, llamacpp; or none",
    )
    parser.add_argument("--gguf", help="the GGUF file for --peers ...,llamacpp")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--adapters", type=int, default=0, help="LoRA adapters (see above)")
    args = parser.parse_args()
    peers = set(args.peers.split(",")) - {"none", ""}
    unknown = peers - {"naive", "transformers-serve", "llamacpp"}
    if unknown:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))}")
    sys.path.insert(0, str(REPO / "benchmarks"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.model:
        model_dir, label = Path(args.model).resolve(), Path(args.model).name
    else:
        from llmray_trainer.tiny_model import create_tiny_model

        model_dir = create_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
        label = "tiny (656k parameters)"

    if args.adapters:
        return adapters_main(args, model_dir, label)

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
            compile_decode=args.compile_decode,
        ),
        free_port(),
    )
    import openai

    served = openai.OpenAI(base_url=llmray_url, api_key="unused").models.list().data[0]
    precision = f"{served.dtype}, quantization {served.quantization}"
    if args.dtype != "auto":
        label += f" ({precision})"
    if args.compile_decode:
        label += ", compileDecode"
    servers = [("llmray", llmray_url, "m")]  # (name, base URL, model name)
    notes, children = [], []
    if "naive" in peers:
        naive_port = free_port()
        naive_server(model_dir, naive_port)
        servers.append(("naive", f"http://127.0.0.1:{naive_port}/v1", "m"))
    if "transformers-serve" in peers:
        ts_port = free_port()
        children.append(transformers_serve(model_dir, ts_port))
        servers.append(("transformers serve", f"http://127.0.0.1:{ts_port}/v1", str(model_dir)))
    if "llamacpp" in peers:
        import llamacpp_peer

        if llamacpp_peer.binary() is None or not args.gguf:
            notes.append(
                "llama.cpp skipped: no `llama-server` (LLAMA_SERVER or PATH) or no --gguf."
            )
        else:
            lc_port = free_port()
            children.append(
                llamacpp_peer.start(Path(args.gguf), lc_port, max(levels), os.cpu_count() or 1)
            )
            servers.append(("llama.cpp", f"http://127.0.0.1:{lc_port}/v1", "m"))
            notes.append(
                f"llama.cpp: `llama-server --parallel {max(levels)}`, {Path(args.gguf).name}."
            )
    time.sleep(3)

    names = [name for name, _, _ in servers]
    rows = []
    for c in levels:
        got = {
            name: load(url, model, c, args.requests, args.max_tokens)
            for name, url, model in servers
        }
        streamed = load(llmray_url, "m", c, max(c, args.requests // 2), args.max_tokens, True)
        ours = got["llmray"]["tokens_per_s"]
        cells = [
            *(f"{got[n]['tokens_per_s']:.0f}" for n in names),
            *(f"{ours / got[n]['tokens_per_s']:.2f}x" for n in names[1:]),
            *(f"{got[n]['p50_s'] * 1000:.0f} / {got[n]['p99_s'] * 1000:.0f}" for n in names),
            f"{streamed['ttft_p50_s'] * 1000:.0f}",
        ]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    single = {name: one_token(url, model) for name, url, model in servers}
    for child in children:
        child.terminate()
    ours_one, inside_one = single["llmray"]
    overhead = ours_one - (inside_one or 0.0)
    header = [
        "concurrency",
        *(f"{n} tokens/s" for n in names),
        *(f"llmray / {n}" for n in names[1:]),
        *(f"{n} p50 / p99 ms" for n in names),
        "llmray TTFT p50 ms (stream)",
    ]
    peers_one = "".join(f"; {n} {single[n][0] * 1000:.0f} ms" for n in names[1:])
    report = "\n".join(
        [
            command_line(__file__),
            "",
            f"Model: {label}; {args.requests} chat completions per level, greedy, max_tokens "
            f"{args.max_tokens}; {os.cpu_count()} cores. llmray: Ray Serve app, transformers "
            f"engine (continuous batching), {precision}"
            + "".join(f"; {n}: {PEER_NOTES[n]}" for n in names[1:] if n in PEER_NOTES)
            + ".",
            *notes,
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---:|" * len(header),
            *rows,
            "",
            f"One-token completion, p50: llmray {ours_one * 1000:.0f} ms, of which "
            f"{overhead * 1000:.1f} ms outside the replica (HTTP + Ray Serve's HAProxy ingress: "
            f"the client's latency minus the replica's `openai-processing-ms`){peers_one}.",
        ]
    )
    print(report)
    if not args.no_write:
        from train_throughput import write_block

        write_block(
            report,
            key="serve_load"
            + ("" if not args.model else "-" + Path(args.model).name)
            + ("" if args.dtype == "auto" else f"-{args.dtype}")
            + ("-compiled" if args.compile_decode else ""),
            title=f"Serving load: {label}",
        )
    from ray import serve

    serve.shutdown()
    return 0


def spread(base_url: str, models: list[str], concurrency: int, requests: int, tokens: int):
    """`load`, request i asking models[i mod len(models)]; tokens/s and p50 / p99."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        done = client.chat.completions.create(
            model=models[i % len(models)],
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=tokens,
            temperature=0,
        )
        return time.perf_counter() - start, done.usage.completion_tokens

    for i in range(len(models)):
        one(i)  # warm-up: every adapter loaded
    results, wall = run_concurrently(one, concurrency, requests)
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        **latency_percentiles(r[0] for r in results),
    }


def first_and_warm(base_url: str, model: str) -> tuple[float, float]:
    """A one-token request's latency the first time `model` is asked for, and then warm."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=1
        )
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def adapters_main(args: argparse.Namespace, model_dir: Path, label: str) -> int:
    sys.path.insert(0, str(REPO))
    from llmray.serve_args import AdapterArgs, ServeArgs, ServeUserConfig
    from llmray_serve import local
    from tests.lora_tools import make_adapter

    work = Path(tempfile.mkdtemp())
    made = [make_adapter(model_dir, work / f"a{i}", seed=i, rank=8) for i in range(args.adapters)]
    names = [f"a{i}" for i in range(args.adapters)]
    c = max(int(x) for x in args.levels.split(","))
    serve_args = ServeArgs(
        name="bench",
        model_uri=str(model_dir),
        served_name="m",
        max_new_tokens=max(256, args.max_tokens),
        max_ongoing_requests=c * 2,
        num_cpus=0,
        max_loaded_adapters=args.adapters,
    )
    config = ServeUserConfig(
        adapters=[AdapterArgs(name=n, uri=str(a)) for n, (a, _) in zip(names, made, strict=True)]
    )
    url = local.start(serve_args, free_port(), user_config=config)
    loads = [first_and_warm(url, n) for n in names]
    mixed = spread(url, names, c, args.requests, args.max_tokens)
    # The same load on adapter a0 merged into a whole model, alone (replaces the app).
    merged_args = serve_args.model_copy(
        update={"model_uri": str(made[0][1]), "max_loaded_adapters": 0}
    )
    local.deploy(merged_args)
    local.wait_running(merged_args.name)
    time.sleep(2)
    merged = spread(url, ["m"], c, args.requests, args.max_tokens)
    first = statistics.median(f for f, _ in loads)
    warm = statistics.median(w for _, w in loads)
    report = "\n".join(
        [
            command_line(__file__),
            "",
            f"Model: {label}; {args.adapters} LoRA adapters (rank 8 on every linear layer) in "
            f"one deployment, against one of them merged and served alone; {args.requests} "
            f"chat completions at concurrency {c}, greedy, max_tokens {args.max_tokens}; "
            f"{os.cpu_count()} cores; transformers engine.",
            "",
            "| served | tokens/s | p50 / p99 ms |",
            "|---|---:|---:|",
            f"| {args.adapters} adapters, load spread over them | {mixed['tokens_per_s']:.0f} | "
            f"{mixed['p50_s'] * 1000:.0f} / {mixed['p99_s'] * 1000:.0f} |",
            f"| 1 merged model | {merged['tokens_per_s']:.0f} | "
            f"{merged['p50_s'] * 1000:.0f} / {merged['p99_s'] * 1000:.0f} |",
            "",
            f"Adapters / merged throughput: {mixed['tokens_per_s'] / merged['tokens_per_s']:.2f}x. "
            f"An adapter's first one-token request (it loads into the replica then), p50 over "
            f"the adapters: {first * 1000:.0f} ms, warm: {warm * 1000:.0f} ms.",
        ]
    )
    print(report)
    if not args.no_write:
        from train_throughput import write_block

        suffix = "" if not args.model else "-" + Path(args.model).name
        write_block(
            report,
            key=f"serve_adapters{suffix}",
            title=f"Serving many adapters: {label}",
        )
    from ray import serve

    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
