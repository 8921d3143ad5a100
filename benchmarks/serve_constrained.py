"""Constrained decoding's cost: tokens/s of json_schema (and forced tool calls) against free
generation from the same prompt, through `llmray serve` (Ray Serve, the transformers engine,
real HTTP).

For each concurrency level, `--requests` chat completions are sent by that many client
threads with the official `openai` client, at temperature 1 (sampled, as structured-output
traffic is), `--max-tokens` each; reported: generated tokens/s over the wall time, the ratio
to free generation from the same prompt (with the tools, for forced tool calls), p50 latency
and the share of constrained answers that parse and validate.

    python benchmarks/serve_constrained.py                      # tiny model, BENCHMARKS.md
    python benchmarks/serve_constrained.py --model models/smollm2-135m-instruct

Free answers run to max_tokens or the end token, constrained ones to the end of their JSON:
tokens/s (not requests/s) compares the per-token cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import command_line, free_port, run_concurrently  # noqa: E402

CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Madrid", "Nairobi"]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": CITIES},
        "summary": {"type": "string", "maxLength": 40},
        "degrees": {"type": "integer", "minimum": -40, "maximum": 50},
        "rain": {"type": "boolean"},
        "hours": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 23},
            "maxItems": 4,
        },
    },
    "required": ["city", "summary", "degrees", "rain", "hours"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": CITIES},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TOOLS = {"tools": [TOOL], "parallel_tool_calls": False}
# Each constrained mode against free generation from the same prompt: the tools section makes
# the prompt ~475 tokens against ~21, and a longer prompt is slower to decode after, grammar
# or not.
MODES = {
    "free": {},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
        }
    },
    "tools, tool_choice auto": TOOLS | {"tool_choice": "auto"},
    "tool_choice required": TOOLS | {"tool_choice": "required"},
}
BASELINE = {"json_schema": "free", "tool_choice required": "tools, tool_choice auto"}


def valid(mode: str, message) -> bool:
    import jsonschema

    try:
        if mode == "json_schema":
            jsonschema.validate(json.loads(message.content), SCHEMA)
        elif mode == "tool_choice required":
            (call,) = message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
        return True
    except Exception:
        return False


def load(base_url: str, mode: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int, bool]:
        start = time.perf_counter()
        city = CITIES[i % len(CITIES)]
        done = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"The weather in {city}, as JSON."}],
            max_tokens=max_tokens,
            temperature=1.0,
            seed=i,
            **MODES[mode],
        )
        return (
            time.perf_counter() - start,
            done.usage.completion_tokens,
            valid(mode, done.choices[0].message),
        )

    one(0)  # warm-up
    results, wall = run_concurrently(one, concurrency, requests)
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "p50_s": statistics.median(r[0] for r in results),
        "tokens": statistics.mean(r[1] for r in results),
        "valid": sum(r[2] for r in results) / len(results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model folder (default: a fresh tiny model)")
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
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
    url = start(
        ServeArgs(
            name="bench",
            model_uri=str(model_dir),
            served_name="m",
            max_new_tokens=args.max_tokens,
            max_ongoing_requests=max(levels) * 2,
            num_cpus=0,
        ),
        free_port(),
    )
    rows = []
    load1 = os.getloadavg()[0]
    for c in levels:
        results = {mode: load(url, mode, c, args.requests, args.max_tokens) for mode in MODES}
        for mode, r in results.items():
            base = BASELINE.get(mode)
            ratio = f"{r['tokens_per_s'] / results[base]['tokens_per_s']:.2f}x" if base else "-"
            share = f"{r['valid'] * 100:.0f}%" if base else "-"
            rows.append(
                f"| {c} | {mode} | {r['tokens_per_s']:.0f} | {ratio} | "
                f"{r['tokens']:.0f} | {r['p50_s'] * 1000:.0f} | {share} |"
            )
    load2 = os.getloadavg()[0]
    report = "\n".join(
        [
            command_line(__file__),
            "",
            f"Model: {label}; {args.requests} chat completions per level and mode, temperature "
            f"1, max_tokens {args.max_tokens}; llmray serve (Ray Serve, transformers engine, "
            f"continuous batching); {os.cpu_count()} cores, load average {load1:.1f} before "
            f"and {load2:.1f} after (other work shares the machine).",
            "",
            "| concurrency | mode | tokens/s | vs free, same prompt | tokens per answer | p50 ms "
            "| answers valid |",
            "|---:|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(report)
    if not args.no_write:
        from train_throughput import write_block

        write_block(
            report,
            key="serve_constrained" + ("" if not args.model else "-" + Path(args.model).name),
            title=f"Constrained decoding: {label}",
        )
    from ray import serve

    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
