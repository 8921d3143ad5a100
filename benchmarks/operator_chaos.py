"""The operator under chaos, with more load than the test: faults and SIGKILLs, then checks.

    python benchmarks/operator_chaos.py [--jobs 100] [--deployments 25] [--kills 20]
                                        [--seeds 1 2 3] [--no-write]

Each seed runs tests/kube/chaos.py's scenario (tests/test_operator_chaos.py runs it with 20
jobs, 5 deployments, 10 kills): `llmray operator` as a process against the in-process API
emulator, which answers a share of the operator's requests with 429 / 500 (half of those
after the change took effect) / 409 and cuts every watch stream within 5 s, while the
process is SIGKILLed at random moments and started again. Reported per seed: the time until
every resource reached its final phase (and since the last restart), the faults injected,
the API calls, the Events per resource, and every problem found (none is the aim).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from tests.kube.chaos import MAX_EVENTS_PER_RESOURCE, ChaosReport, run_chaos  # noqa: E402


async def run(jobs: int, deployments: int, kills: int, seed: int) -> ChaosReport:
    with tempfile.TemporaryDirectory() as tmp:
        return await run_chaos(
            Path(tmp), jobs=jobs, deployments=deployments, kills=kills, seed=seed, timeout=900
        )


def report(results: list[tuple[int, ChaosReport]], command: str) -> str:
    jobs, deployments = results[0][1].jobs, results[0][1].deployments
    lines = [
        f"`{command}` ({jobs} FineTuneJobs + {deployments} LLMDeployments; operator process + "
        "in-process API emulator with faults, 2-core CPU)",
        "",
        "| seed | kills | all final after | since last restart | 429 | 500 (after) | 409 | "
        "watches cut | API calls | Events (max per resource) | problems |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for seed, r in results:
        f = r.faults
        lines.append(
            f"| {seed} | {r.kills} | {r.converged_s:.0f} s | {r.settled_s:.0f} s | "
            f"{f.get('throttle', 0)} | {f.get('error', 0) + f.get('error-after', 0)} "
            f"({f.get('error-after', 0)}) | {f.get('conflict', 0)} | {f.get('watch-drop', 0)} | "
            f"{r.api_calls} | {r.events} ({r.max_events_per_resource}, limit "
            f"{MAX_EVENTS_PER_RESOURCE}) | {'; '.join(r.problems[:3]) or 'none'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--deployments", type=int, default=25)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-write", action="store_true", help="print, do not edit BENCHMARKS.md")
    args = parser.parse_args()
    results = [
        (seed, asyncio.run(run(args.jobs, args.deployments, args.kills, seed)))
        for seed in args.seeds
    ]
    command = "python benchmarks/operator_chaos.py " + " ".join(sys.argv[1:])
    text = report(results, command.strip())
    print(text)
    if not args.no_write:
        from train_throughput import write_block

        write_block(text, key="operator_chaos", title="Operator under chaos")
    return 0 if all(not r.problems for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
