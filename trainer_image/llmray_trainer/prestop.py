"""The training pods' preStop hook: `python -m llmray_trainer.prestop --timeout SECONDS`.

Kubernetes runs it in a worker pod that is being deleted (an eviction, a drained or spot
node) before it sends SIGTERM to the pod's main process (`ray start`), and both count against
the pod's terminationGracePeriodSeconds. It sends SIGTERM to the Ray Train workers in the pod,
which checkpoint at the next step boundary and stop (preemption.py), and waits until they are
gone or the timeout passes; then the kubelet goes on to stop Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from llmray import procs

# Ray's process title of a Ray Train worker actor, e.g. "ray::RayTrainWorker.run_train_fn".
WORKER_TITLE = "ray::RayTrainWorker"


def train_workers(title: str = WORKER_TITLE) -> list[int]:
    """The Ray Train worker processes of this pod (container)."""
    return procs.with_command_prefix(title)


def stop_workers(timeout: float, poll: float = 0.5, title: str = WORKER_TITLE) -> list[int]:
    """SIGTERM every Ray Train worker here; wait until they exited, at most `timeout` seconds.
    Returns the ones still running."""
    started = {pid: procs.start_time(pid) for pid in train_workers(title)}
    for pid in started:
        with contextlib.suppress(ProcessLookupError):  # gone since
            os.kill(pid, signal.SIGTERM)

    def running() -> list[int]:
        return [pid for pid, t in started.items() if procs.is_running(pid, t)]

    deadline = time.monotonic() + timeout
    left = running()
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = running()
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmray_trainer.prestop")
    parser.add_argument("--timeout", type=float, required=True, help="seconds to wait at most")
    args = parser.parse_args(argv)
    left = stop_workers(args.timeout)
    print(f"llmray prestop: {len(left)} training worker(s) still running", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
