"""Training memory: peak RSS of each Ray Train worker in load / train / export, beside the plan.

Random-init Llamas of ~134M and ~480M parameters (vocabulary 32000, fp32), 2 workers, 3 steps
on the CPU, for DDP, ZeRO-2, ZeRO-3, ZeRO-3 with optimizer and parameter offload, and LoRA
(DDP merged, ZeRO-3 adapter only). Each run is a fresh `llmray finetune` process (a cold Ray);
this process samples the RSS of every `ray::RayTrainWorker` process below it every 0.1 s
(psutil) and splits the samples into phases by the run's progress records: load (until the
`setup` record), train (until the last step), export (until `exported`). Rank 0 is the pid
the `setup` record names. Beside each peak: `llmray plan`'s prediction (llmray/sizing.py).

    flock /tmp/llmray-heavy.lock python benchmarks/train_memory.py     # table + BENCHMARKS.md
    python benchmarks/train_memory.py --sizes 134m --runs ddp,zero3 --no-write
    python benchmarks/train_memory.py --folder DIR --replan   # the plan again, same runs

A run the plan predicts would not fit in this machine's free memory (both workers together)
is skipped and listed as such: Ray's OOM monitor would kill it, and other work with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "instruction.jsonl"
GIB = 2**30
SIZES = {  # name -> (hidden, layers, intermediate, heads)
    "134m": (768, 12, 2048, 12),
    "480m": (1280, 20, 3456, 20),
}
LORA = {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
RUNS = {
    "ddp": ({"type": "ddp"}, {}),
    "zero2": ({"type": "deepspeed", "zeroStage": 2}, {}),
    "zero3": ({"type": "deepspeed", "zeroStage": 3}, {}),
    "zero3-offload": (
        {"type": "deepspeed", "zeroStage": 3, "offloadOptimizer": True, "offloadParameters": True},
        {},
    ),
    "lora-ddp": ({"type": "ddp"}, {"method": "lora", "lora": LORA}),
    "lora-zero3": (
        {"type": "deepspeed", "zeroStage": 3},
        {"method": "lora", "lora": LORA, "output": {"mergeLora": False}},
    ),
}
PHASES = ("load", "train", "export")


def make_model(folder: Path, size: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmray_trainer.tiny_model import default_corpus, train_tokenizer

    out = folder / f"llama-{size}"
    if (out / "config.json").exists():
        return out
    hidden, layers, inter, heads = SIZES[size]
    tokenizer = train_tokenizer(default_corpus(), 1024)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def job_doc(name: str, model: Path, folder: Path, strategy: dict, extra: dict) -> dict:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(model)},
            "dataset": {"train": str(DATA), "format": "instruction", "maxSeqLength": 128},
            "hyperparameters": {
                "maxSteps": 3,
                "batchSizePerWorker": 2,
                "learningRate": 1e-4,
                "lrScheduler": "constant",
            },
            "strategy": strategy,
            "compute": {"workers": 2},
            "checkpointing": {"everyEpoch": False, "storageUri": str(folder / "runs")},
            "output": {"uri": str(folder / "out" / name)},
            **extra,
        },
    }


class Sampler(threading.Thread):
    """RSS of every Ray Train worker below `root`, every 0.1 s: {pid: [(time, rss)]}."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.samples, self.stop = root, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                procs = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now = time.time()
            for proc in procs:
                try:
                    if not proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                        continue
                    self.samples.setdefault(proc.pid, []).append((now, proc.memory_info().rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                    continue


def measure(job: Path, home: Path) -> dict:
    env = {**os.environ, "LLMRAY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    code = f"from llmray_trainer.local import finetune_file; finetune_file({str(job)!r})"
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = Sampler(child.pid)
    sampler.start()
    _, err = child.communicate()
    sampler.stop.set()
    sampler.join()
    if child.returncode:
        raise RuntimeError(f"{job.name} failed:\n{err[-3000:]}")
    name = yaml.safe_load(job.read_text())["metadata"]["name"]
    records = [json.loads(x) for x in (home / "jobs" / name / "progress.jsonl").open()]
    setup = next(r for r in records if r["event"] == "setup")
    last_step = max(r["time"] for r in records if r["event"] == "step")
    exported = next(r["time"] for r in records if r["event"] == "exported")
    bounds = {"load": (0, setup["time"]), "train": (setup["time"], last_step)}
    bounds["export"] = (last_step, exported + 0.5)
    peaks: dict[str, dict[str, float]] = {"rank0": {}, "other": {}}
    for pid, series in sampler.samples.items():
        who = "rank0" if pid == setup["pid"] else "other"
        for phase, (lo, hi) in bounds.items():
            values = [rss for t, rss in series if lo <= t <= hi]
            if values:
                peaks[who][phase] = max(peaks[who].get(phase, 0), max(values))
    return peaks


def predict(job: Path) -> dict:
    from llmray.api import load_resource
    from llmray.model_shape import resolve_shape
    from llmray.sizing import plan

    spec = load_resource(job).spec
    shape = resolve_shape(spec.baseModel.uri, None, job.parent, job.parent)
    p = plan(spec, shape)
    return {
        "rank0": {ph: p.rank0.host[ph].total for ph in PHASES},
        "other": {ph: p.per_worker.host[ph].total for ph in PHASES},
        "parameters": shape.parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--folder", default="", help="keep models and runs here")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument(
        "--replan",
        action="store_true",
        help="no new runs: the plan's predictions again, for the measurements in --folder",
    )
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="llmray-mem-"))
    if args.replan:
        rows = json.loads((folder / "results.json").read_text())
        for row in rows:
            row["plan"] = want = predict(folder / f"mem-{row['size']}-{row['run']}.yaml")
            if "skipped" in row:
                need = (want["rank0"]["train"] + want["other"]["train"]) / GIB
                row["skipped"] = (
                    f"plan: {need:.1f} GiB for 2 workers, " + row["skipped"].split(", ", 1)[1]
                )
        finish(folder, rows, write=not args.no_write)
        return
    rows = []
    for size in args.sizes.split(","):
        model = make_model(folder, size)
        for run in args.runs.split(","):
            strategy, extra = RUNS[run]
            name = f"mem-{size}-{run}"
            job = folder / f"{name}.yaml"
            job.write_text(yaml.safe_dump(job_doc(name, model, folder, strategy, extra)))
            want = predict(job)
            need = want["rank0"]["train"] + want["other"]["train"]
            free = psutil.virtual_memory().available
            row = {"size": size, "run": run, "plan": want, "parameters": want["parameters"]}
            if need > 0.8 * free:
                row["skipped"] = f"plan: {need / GIB:.1f} GiB for 2 workers, {free / GIB:.1f} free"
            else:
                row["measured"] = measure(job, folder / "home")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finish(folder, rows, write=not args.no_write)


def finish(folder: Path, rows: list[dict], *, write: bool) -> None:
    (folder / "results.json").write_text(json.dumps(rows, indent=2))
    table = render(rows)
    print(table)
    if write:
        write_benchmarks(table)


def render(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "`flock /tmp/llmray-heavy.lock python benchmarks/train_memory.py`",
        "",
        f"Random-init Llama (vocabulary 32000, fp32), 2 workers, 3 steps, batch 2 x 128 tokens per "
        f"worker, CPU ({os.cpu_count()} cores, {cpu}, {psutil.virtual_memory().total / GIB:.0f} "
        "GiB). Peak RSS per worker in GiB, measured / `llmray plan`; rank 0 and the other "
        "worker apart.",
        "",
        "| model | run | load rank 0 | load other | train rank 0 | train other | export rank 0 "
        "| export other |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = f"{r['parameters'] / 1e6:.0f}M"
        if "skipped" in r:
            lines.append(f"| {label} | {r['run']} | skipped ({r['skipped']}) ||||||")
            continue
        cells = []
        for ph in PHASES:
            for who in ("rank0", "other"):
                got = r["measured"][who].get(ph)
                plan = r["plan"][who][ph]
                cells.append(f"{got / GIB:.2f} / {plan / GIB:.2f}" if got else "-")
        lines.append(f"| {label} | {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_benchmarks(table: str) -> None:
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- train_memory:begin -->", "<!-- train_memory:end -->"
    block = f"{begin}\n{table}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n## Training memory\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
