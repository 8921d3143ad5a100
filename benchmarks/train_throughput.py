"""Training throughput: `llmray finetune` (Ray Train, 2 workers) vs a plain PyTorch loop.

Same model (a random-init Llama big enough that matmuls dominate), same data, same global batch,
same number of steps, same total threads: the plain loop is one process with all the cores,
llmray runs `workers` processes with cores/workers threads each. Reported: steady-state
tokens/s (median of per-step rates after warm-up), Ray Train's overhead against the plain loop,
and job start (from the call to the first finished step, Ray start included).

    python benchmarks/train_throughput.py            # prints a table, updates BENCHMARKS.md
    python benchmarks/train_throughput.py --steps 20 --no-write

Each llmray configuration runs in a fresh process (a cold Ray start, as a user gets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "instruction.jsonl"
WARMUP_STEPS = 3
SEQ = 128


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    from llmray_trainer.tiny_model import create_tiny_model

    return create_tiny_model(
        folder / "model", hidden_size=hidden, layers=layers, heads=8, kv_heads=4, vocab_size=2048
    )


def job_yaml(folder: Path, name: str, model: Path, strategy: dict, args, extra: dict) -> Path:
    doc = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(model)},
            "dataset": {
                "train": str(DATA),
                "format": "instruction",
                "maxSeqLength": SEQ,
                "maskPrompt": False,
            },
            "hyperparameters": {
                "maxSteps": args.steps,
                "learningRate": 1e-3,
                "batchSizePerWorker": args.batch // args.workers,
                "warmupRatio": 0.0,
                "lrScheduler": "constant",
                "seed": 1,
                "logEverySteps": 1,
                **extra,
            },
            "strategy": strategy,
            "compute": {"workers": args.workers, "ipex": args.ipex},
            "checkpointing": {"everyEpoch": False, "storageUri": str(folder / "runs")},
            "output": {"uri": str(folder / "out" / name)},
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_llmray(job: Path) -> dict:
    """One `llmray finetune` in a fresh process; per-step times from its progress records."""
    code = (
        "import json, sys, time\n"
        "start = time.time()\n"
        "from llmray_trainer.local import finetune_file\n"
        f"r = finetune_file({str(job)!r})\n"
        "print('RESULT ' + json.dumps({'start': start, 'end': time.time(), "
        "'steps': r.steps}))\n"
    )
    env = {**os.environ, "LLMRAY_HOME": str(job.parent / "home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"llmray run {job.name} failed")
    out = json.loads(lines[-1][len("RESULT ") :])
    steps = out["steps"]
    rates = [s["tokensPerSecond"] for s in steps[WARMUP_STEPS:]]
    return {
        "tokens_per_s": statistics.median(rates),
        "first_step_s": steps[0]["time"] - out["start"],
        "total_s": out["end"] - out["start"],
    }


def run_plain(model_dir: Path, args) -> dict:
    """The reference: one process, all threads, the same recipe without Ray or DDP."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_trainer.data import collate, count_tokens, load_records, tokenize_records
    from llmray_trainer.optim import make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = load_records(DATA, "instruction")
    examples = tokenize_records(records, tok, "instruction", SEQ, False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = make_optimizer(model.parameters(), lr=1e-3)  # llmray's, so the comparison is fair
    model.train()
    rates = []
    for step in range(args.steps):
        lo = (step * args.batch) % (len(examples) - args.batch)
        batch = collate(list(examples[lo : lo + args.batch]), tok.pad_token_id)
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(count_tokens(batch) / (time.perf_counter() - t))
    return {"tokens_per_s": statistics.median(rates[WARMUP_STEPS:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch (all workers)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 2,
        help="total threads (plain loop); workers get threads/workers each",
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also ddp with torchCompile")
    parser.add_argument("--ipex", action="store_true", help="compute.ipex: true (IPEX venv)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="llmray-bench-"))
    model = make_model(folder, args.hidden, args.layers)
    params = (model / "model.safetensors").stat().st_size / 4  # fp32 weights
    rows = {"plain PyTorch loop (1 process)": run_plain(model, args)}
    runs = [
        ("llmray ddp", {"type": "ddp"}, {}),
        ("llmray deepspeed ZeRO-2", {"type": "deepspeed", "zeroStage": 2}, {}),
    ]
    if args.compile:
        runs.append(("llmray ddp + torchCompile", {"type": "ddp"}, {"torchCompile": True}))
    for label, strategy, extra in runs:
        name = "-".join(label.lower().replace("+", "").split()[1:])
        rows[f"{label} ({args.workers} workers)"] = run_llmray(
            job_yaml(folder, name, model, strategy, args, extra)
        )

    base = rows["plain PyTorch loop (1 process)"]["tokens_per_s"]
    table = [
        "| run | tokens/s | vs plain loop | job start (to first step) | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        overhead = f"{(r['tokens_per_s'] / base - 1) * 100:+.1f}%"
        start = f"{r['first_step_s']:.1f} s" if "first_step_s" in r else "-"
        total = f"{r['total_s']:.1f} s" if "total_s" in r else "-"
        table.append(f"| {label} | {r['tokens_per_s']:.0f} | {overhead} | {start} | {total} |")
    setup = (
        f"Model: random-init Llama, {params / 1e6:.1f}M parameters (hidden {args.hidden}, "
        f"{args.layers} layers); data: examples/data/instruction.jsonl at {SEQ} tokens; global "
        f"batch {args.batch}; {args.steps} steps, median per-step tokens/s after "
        f"{WARMUP_STEPS} warm-up steps; {args.threads} threads in total. Machine: "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}."
    )
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    report = "\n".join([f"`{command.strip()}`", "", setup, "", *table])
    print(report)
    if not args.no_write:
        write_results(report, ipex=args.ipex)
    return 0


def write_results(report: str, *, ipex: bool) -> None:
    title = "Training throughput" + (" with IPEX" if ipex else "")
    write_block(report, key="train_throughput" + ("-ipex" if ipex else ""), title=title)


def write_block(report: str, *, key: str, title: str) -> None:
    """Replace the block `key` of BENCHMARKS.md (or add it under `title`)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{report}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    sys.exit(main())
