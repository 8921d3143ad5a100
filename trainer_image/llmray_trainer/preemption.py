"""Preemption: a worker told to stop saves a checkpoint at the next step boundary, then the run
starts again from it, so a preemption loses at most the step in progress.

Two ways a worker is told:

- SIGTERM to its process: what the pod's preStop hook sends (`python -m
  llmray_trainer.preempt`, before the kubelet's SIGTERM to the pod), and what a user or a
  supervisor sends to a local run. Ray's own handler would end the process at once; this one
  (`StopSignal`) only notes it.
- A Ray node drain (Ray Train's `get_preemption_info`): `ray start` drains its node when the
  pod's main process gets SIGTERM, and so do Ray's autoscaler and `ray drain-node`.

Every rank must stop at the same step (`ray.train.report` is a barrier), so at each step
boundary the ranks all-reduce their "stop requested" flag (`StopSignal.agreed`); the loop
then saves on every rank, reports a `preempted` record and returns, and the driver runs the
trainer again (same run name: Ray Train resumes from that checkpoint). A preemption does not
count against spec.maxRetries, which is for failures (as Ray Train counts node preemptions
apart, `FailureConfig.max_preemption_failures`).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

log = logging.getLogger("llmray.trainer")


class StopSignal:
    """This worker's "stop requested" flag, and the agreement of all ranks on it."""

    def __init__(self, previous: Any) -> None:
        self.requested = threading.Event()
        self.active = True  # False outside the training loop
        self._previous = previous if previous is not None else signal.SIG_DFL

    def handle(self, signum: int, frame: Any) -> None:
        if not self.active:  # e.g. during the export: Ray's own behaviour (exit)
            self._delegate(signum, frame)
        elif self.requested.is_set():
            log.warning("second SIGTERM: stopping now, without a checkpoint")
            self._delegate(signum, frame)
        else:
            log.warning("SIGTERM: checkpointing at the next step boundary, then stopping")
            self.requested.set()

    def _delegate(self, signum: int, frame: Any) -> None:
        if callable(self._previous):
            self._previous(signum, frame)
        else:
            signal.signal(signum, self._previous)
            signal.raise_signal(signum)

    def agreed(self, world: int, device: Any) -> bool:
        """Whether any rank was told to stop (this worker, or a Ray drain of any node).
        Every rank calls this at the same points: it is a collective."""
        drained = ray.train.get_preemption_info() is not None  # Ray Train's own barrier
        flag = torch.tensor([float(self.requested.is_set() or drained)], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


_current: StopSignal | None = None  # this process's, set on its main thread


def _install_on_main_thread() -> None:
    global _current
    _current = StopSignal(signal.getsignal(signal.SIGTERM))
    signal.signal(signal.SIGTERM, _current.handle)


def install() -> StopSignal:
    """Take SIGTERM on this worker process. Python sets signal handlers on the main thread
    only, and Ray Train runs `train_func` on another thread of its worker actor, whose main
    thread serves the actor's calls: so the handler is set by a call to this very actor
    (`RayTrainWorker.execute`, which Ray Train uses itself to run setup on its workers)."""
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(_install_on_main_thread))
    assert _current is not None
    return _current
