"""Where one training step's time goes: DDP vs DeepSpeed ZeRO on 2 CPU ranks, phase by phase.

The model, data and batch of `benchmarks/train_throughput.py` (random-init Llama, global batch
16, 128 tokens), two gloo ranks with one thread each, without Ray, with what
`llmray_trainer.loop` uses: DDP with its kwargs, DeepSpeed with the rendered config. Rank 0
times forward, backward and step of every step after warm-up, and optionally runs cProfile
over them.

    python benchmarks/train_step_profile.py                       # ddp and zero2, medians
    python benchmarks/train_step_profile.py --runs zero2 --cprofile 25
    python benchmarks/train_step_profile.py --runs zero2 --set reduce_scatter=false
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
sys.path[:0] = [str(REPO), str(REPO / "trainer_image")]

from benchmarks.train_throughput import DATA, SEQ, WARMUP_STEPS, make_model  # noqa: E402


def worker(rank: int, world: int, port: int, args: argparse.Namespace, model_dir: Path) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"})
    os.environ.update(
        {
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
    )
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray_trainer.data import collate, count_tokens, load_records, tokenize_records
    from llmray_trainer.optim import make_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = tokenize_records(load_records(DATA, "instruction"), tok, "instruction", SEQ, False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = make_optimizer(model.parameters(), lr=1e-3)
    per = args.batch // world
    engine = None
    if args.run == "ddp":
        from llmray_trainer.loop import DDP_CPU_KWARGS

        model = torch.nn.parallel.DistributedDataParallel(model, **DDP_CPU_KWARGS)
    else:
        import deepspeed

        ds_config = deepspeed_config(int(args.run[-1]), world, per, model.config.hidden_size)
        for item in args.set:
            key, value = item.split("=", 1)
            ds_config["zero_optimization"][key] = json.loads(value)
        engine, opt, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_config, dist_init_required=False
        )
        if rank == 0:
            print("zero_optimization", json.dumps(ds_config["zero_optimization"]), flush=True)
    model.train()
    times: dict[str, list[float]] = {"forward": [], "backward": [], "step": [], "total": []}
    tokens: list[int] = []
    profiler = None
    for step in range(args.steps):
        lo = (step * args.batch + rank * per) % (len(examples) - args.batch)
        batch = collate(list(examples[lo : lo + per]), tok.pad_token_id)
        if step == WARMUP_STEPS and rank == 0 and args.cprofile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        dist.barrier()
        t0 = time.perf_counter()
        if engine is not None:
            loss = engine(**batch).loss
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
        else:
            loss = model(**batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        float(loss.detach())
        if step >= WARMUP_STEPS:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                times[key].append(value * 1000)
            tokens.append(count_tokens(batch))
        if rank == 0 and args.losses:
            print(f"step {step} loss {float(loss):.4f}", flush=True)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.cprofile)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = world * statistics.median(
            t / (s / 1000) for t, s in zip(tokens, times["total"], strict=True)
        )
        print(
            f"RESULT {args.run}: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in med.items())
            + f"; ~{tps:.0f} tokens/s (both ranks)",
            flush=True,
        )
    dist.destroy_process_group()


def deepspeed_config(stage: int, world: int, per_worker: int, hidden: int) -> dict:
    """llmray's rendered config for this job (trainer_image/llmray_trainer/deepspeed_config.py)."""
    from llmray.api.finetunejob import FineTuneJobSpec
    from llmray_trainer.deepspeed_config import render_deepspeed_config

    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///model"},
            "dataset": {"train": "file:///data.jsonl"},
            "hyperparameters": {"batchSizePerWorker": per_worker},
            "strategy": {"type": "deepspeed", "zeroStage": stage},
        }
    )
    return render_deepspeed_config(spec, world, hidden)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="ddp,zero2", help="comma list of ddp, zero1, zero2")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cprofile", type=int, default=0, help="print the top N functions")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime, cumtime")
    parser.add_argument("--losses", action="store_true", help="print rank 0's loss each step")
    parser.add_argument(
        "--set", action="append", default=[], help="zero_optimization KEY=JSON override"
    )
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from llmray.localray import free_port

    with tempfile.TemporaryDirectory(prefix="llmray-prof-") as tmp:
        model_dir = make_model(Path(tmp), args.hidden, args.layers)
        for run in args.runs.split(","):
            args.run = run
            mp.spawn(worker, args=(2, free_port(), args, model_dir), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
