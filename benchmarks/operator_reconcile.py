"""Operator reconcile speed and memory, against the in-process Kubernetes API emulator.

    python benchmarks/operator_reconcile.py [--sequential 50] [--burst 200] [--no-write]

The operator runs as `llmray operator` in its own process (what the Helm chart runs), talking
HTTP to the emulator (tests/kube/emulator.py) in this process:
  1. FineTuneJob created -> its RayJob present, one at a time: p50 / p95 latency
  2. `--burst` FineTuneJobs created at once -> all RayJobs present: wall time
  3. the operator process's peak resident memory (VmHWM) over the whole run
Aims (issue 4): p95 under 1 s, 200 jobs under 60 s, memory under 200 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from tests.kube.emulator import emulated_cluster  # noqa: E402
from tests.kube.operator_crds import CRDS, RAYJOBS  # noqa: E402

NS = "bench"


def job(name: str) -> dict:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "strategy": {"type": "deepspeed", "zeroStage": 3},
            "compute": {
                "accelerator": "nvidia-gpu",
                "workers": 6,
                "resourcesPerWorker": {"cpu": "8", "memory": "48Gi", "gpu": 1},
                "rank0": {"nodeSelector": {"llmray.io/memory-class": "large"}},
            },
            "checkpointing": {"storageUri": "s3://runs"},
        },
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_for(check, timeout: float, poll: float = 0.002) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the operator did not create the RayJob in time")
        await asyncio.sleep(poll)
    return time.perf_counter() - start


async def run(sequential: int, burst: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        async with emulated_cluster(Path(tmp), CRDS) as (kube, kubeconfig):
            env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
            log = (Path(tmp) / "operator.log").open("w")
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llmray_cli",
                    "operator",
                    "--metrics-port",
                    "0",
                    "--health-port",
                    "0",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                # Ready once it watches FineTuneJobs.
                await wait_for(
                    lambda: any(c[0] == "watch" and c[2] == "finetunejobs" for c in kube.api_calls),
                    60,
                    0.05,
                )
                await asyncio.sleep(1)
                latencies = []
                for i in range(sequential):
                    name = f"seq-{i}"
                    start = time.perf_counter()
                    await kube.apply_object(job(name))
                    await wait_for(lambda n=name: kube.get_object(RAYJOBS, NS, n), 30)
                    latencies.append(time.perf_counter() - start)
                start = time.perf_counter()
                await asyncio.gather(*(kube.apply_object(job(f"burst-{i}")) for i in range(burst)))
                total = sequential + burst
                await wait_for(lambda: len(kube.list_objects(RAYJOBS, NS)) >= total, 600, 0.01)
                burst_s = time.perf_counter() - start
                memory = peak_rss_mb(proc.pid)
            except Exception:
                print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                proc.terminate()  # kopf stops its watches: keep serving meanwhile
                await asyncio.to_thread(proc.wait, 60)
    q = statistics.quantiles(latencies, n=20)
    return {
        "p50": statistics.median(latencies),
        "p95": q[18],
        "burst": burst,
        "burst_s": burst_s,
        "memory_mb": memory,
        "sequential": sequential,
    }


def report(r: dict, command: str) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return "\n".join(
        [
            f"`{command}` (operator process + in-process API emulator, 2-core CPU)",
            "",
            "| measure | result | aim |",
            "|---|---:|---|",
            f"| FineTuneJob -> RayJob, p50 ({r['sequential']} one at a time) | "
            f"{r['p50'] * 1000:.0f} ms | |",
            f"| FineTuneJob -> RayJob, p95 | {r['p95'] * 1000:.0f} ms | < 1 s: "
            f"{verdict(r['p95'] < 1)} |",
            f"| {r['burst']} FineTuneJobs at once -> all RayJobs | {r['burst_s']:.1f} s | "
            f"< 60 s: {verdict(r['burst_s'] < 60)} |",
            f"| operator peak memory (VmHWM) | {r['memory_mb']:.0f} MB | < 200 MB: "
            f"{verdict(r['memory_mb'] < 200)} |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print, do not edit BENCHMARKS.md")
    args = parser.parse_args()
    result = asyncio.run(run(args.sequential, args.burst))
    command = "python benchmarks/operator_reconcile.py " + " ".join(sys.argv[1:])
    text = report(result, command.strip())
    print(text)
    if not args.no_write:
        from train_throughput import write_block

        write_block(text, key="operator_reconcile", title="Operator reconcile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
