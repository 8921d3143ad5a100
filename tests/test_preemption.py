"""Preemption: a real SIGTERM to a training worker mid-run (what a pod eviction or a spot node
draining sends) makes every rank checkpoint at the next step boundary; the run starts again
from that checkpoint and goes on from the step after it. Periodic checkpoints are off, so the
only checkpoint there is to resume from is the one the SIGTERM caused."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.test_finetune import assert_model_generates, finetune, write_job

pytestmark = pytest.mark.integration


def sigterm_a_worker_at(progress_file: Path, step: int, stop: threading.Event) -> dict:
    """From outside the run: SIGTERM one Ray Train worker process (found through Ray's state
    API, and by the pods' preStop hook as it finds them) once the run has logged `step`."""
    import ray
    from ray.util.state import list_actors

    from llmray_trainer.prestop import train_workers

    gcs = ray.get_runtime_context().gcs_address
    while not stop.wait(0.1):
        lines = progress_file.read_text().splitlines() if progress_file.exists() else []
        steps = [r["step"] for r in map(json.loads, lines) if r.get("event") == "step"]
        if not steps or steps[-1] < step:
            continue
        workers = list_actors(
            address=gcs,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
        if not workers:
            continue
        assert workers[-1].pid in train_workers()  # what the preStop hook signals in a pod
        os.kill(workers[-1].pid, signal.SIGTERM)
        return {"pid": workers[-1].pid, "last_step": steps[-1]}
    return {}


def test_sigterm_checkpoints_at_the_next_step_and_resumes_after_it(
    ray_session, tmp_path, tiny_model, small_data
):
    total = 60
    job = write_job(
        tmp_path,
        "preempted",
        tiny_model,
        small_data,
        # No retries for failures: a preemption is not one.
        maxRetries=0,
        checkpointing={"everyEpoch": False},
        hyperparameters={"maxSteps": total, "epochs": 100},
    )
    progress = Path(os.environ["LLMRAY_HOME"]) / "jobs" / "preempted" / "progress.jsonl"
    stop = threading.Event()
    sent: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: sent.update(sigterm_a_worker_at(progress, 3, stop)), daemon=True
    )
    sender.start()
    try:
        result = finetune(job)
    finally:
        stop.set()
        sender.join()
    assert sent, "the run ended before a worker could be sent SIGTERM"
    events = [r["event"] for r in result.records]
    assert events.count("preempted") == 1, events
    stopped = next(r["step"] for r in result.records if r["event"] == "preempted")
    # Stopped at a step boundary after the signal, with a checkpoint of that very step ...
    assert sent["last_step"] <= stopped < total
    checkpoints = [r["step"] for r in result.records if r["event"] == "checkpoint"]
    assert checkpoints[0] == stopped
    # ... and the next attempt resumed from it and went on from the step after it.
    assert [r["step"] for r in result.records if r["event"] == "resumed"] == [stopped]
    after = result.records[events.index("resumed") :]
    assert [r["step"] for r in after if r["event"] == "step"] == list(range(stopped + 1, total + 1))
    before = result.records[: events.index("preempted")]
    assert [r["step"] for r in before if r["event"] == "step"] == list(range(1, stopped + 1))
    assert_model_generates(result.model_uri)
