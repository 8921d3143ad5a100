"""The progress channel (trainer -> operator / `llmray finetune`) and the local status file:
both carry the FineTuneJob status models' fields, nothing else."""

from __future__ import annotations

import json
import math

from llmray import paths
from llmray.api.finetunejob import FineTuneJobStatus, Progress
from llmray.progress import format_line, last_record, progress_of


def test_a_record_round_trips_through_a_log_line():
    record = {"event": "step", "step": 3, "trainLoss": 1.5, "checkpoint": "s3://b/ck"}
    lines = ["INFO starting", format_line(record), "WARN something else"]
    assert last_record(lines) == record


def test_progress_keeps_the_status_fields_a_record_carries():
    progress = progress_of(
        {"event": "step", "step": 3, "totalSteps": 9, "trainLoss": 1.5, "evalLoss": None}
    )
    assert progress.model_dump(exclude_unset=True) == {"step": 3, "totalSteps": 9, "trainLoss": 1.5}
    assert isinstance(progress, Progress)


def test_unusable_values_leave_the_last_known_ones():
    """A NaN loss (a diverged run) or a mistyped value must not make the status unwritable:
    JSON has no NaN and the API server rejects a string where the CRD says integer."""
    progress = progress_of({"step": "seven", "trainLoss": math.nan, "tokensPerSecond": 12.5})
    assert progress.model_dump(exclude_unset=True) == {"tokensPerSecond": 12.5}


def test_local_status_file_is_the_finetunejob_status_shape(tmp_path, monkeypatch):
    """What `llmray finetune` writes is what `llmray serve` reads for fineTuneJobRef. The
    training itself is not what this checks: `run` is replaced by a finished result (the
    integration tests in test_finetune.py run it for real)."""
    from llmray_trainer import local
    from llmray_trainer.launcher import RunResult

    monkeypatch.setenv("LLMRAY_HOME", str(tmp_path / "home"))
    job = tmp_path / "job.yaml"
    job.write_text(
        "apiVersion: llmray.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: j}\n"
        "spec: {baseModel: {uri: models/tiny}, dataset: {train: d.jsonl}}\n"
    )
    records = [
        {"event": "step", "step": 1, "totalSteps": 2, "trainLoss": 2.0, "tokensPerSecond": 9.0},
        {"event": "step", "step": 2, "totalSteps": 2, "trainLoss": 1.0, "tokensPerSecond": 8.0},
        {"event": "exported", "step": 2, "evalLoss": 1.25, "model": "/m"},
    ]
    monkeypatch.setattr(
        local, "run", lambda cfg: RunResult(cfg.name, "/m", "/ck/checkpoint_000002", records)
    )
    local.finetune_file(job)
    status = json.loads((paths.job_dir("j") / "status.json").read_text())
    assert FineTuneJobStatus.model_validate(status).phase == "Succeeded"
    assert status["model"] == {"uri": "/m"}
    assert status["latestCheckpoint"] == "/ck/checkpoint_000002"
    assert status["progress"] == {
        "step": 2,
        "totalSteps": 2,
        "trainLoss": 1.0,
        "tokensPerSecond": 8.0,
        "evalLoss": 1.25,
    }
    assert set(status) == {
        "phase",
        "startTime",
        "completionTime",
        "latestCheckpoint",
        "model",
        "progress",
    }


def test_the_last_record_carries_the_latest_checkpoint():
    """The operator may read the log only after the run: the `exported` record names no
    checkpoint, the `checkpoint` records before it do (status.latestCheckpoint)."""
    lines = [
        format_line(
            {"event": "checkpoint", "step": 2, "checkpoint": "s3://b/r/checkpoint_step00000002"}
        ),
        format_line(
            {"event": "checkpoint", "step": 4, "checkpoint": "s3://b/r/checkpoint_step00000004"}
        ),
        format_line({"event": "exported", "step": 4, "model": "s3://b/r/model"}),
    ]
    last = last_record(lines)
    assert last["event"] == "exported"
    assert last["checkpoint"] == "s3://b/r/checkpoint_step00000004"


def test_failure_of_finds_the_trainers_message():
    from llmray.progress import failure_of

    text = "Traceback ...\nValueError: x\n" + format_line({"event": "failed", "message": "why"})
    assert failure_of(text) == "why"
    assert failure_of("Job entrypoint command failed with exit code 1") is None
