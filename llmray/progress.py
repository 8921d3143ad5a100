"""The machine-readable progress channel between the trainer and whoever watches it.

The trainer's driver (the RayJob entrypoint, or `llmray finetune`) prints one line per
progress record on stdout, which lands in the RayJob's job logs (Ray dashboard
`/api/jobs/<id>/logs`), and appends it to a JSON-lines file when asked::

    llmray-progress {"epoch": 0, "step": 12, "totalSteps": 50, "trainLoss": 2.31, ...}

The operator mirrors the last record into `FineTuneJob.status.progress`. Pure and
dependency-free so the operator image can parse it without torch or ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

PREFIX = "llmray-progress "
# Keys of a record; the first six match FineTuneJob status.progress.
KEYS = (
    "epoch",
    "step",
    "totalSteps",
    "trainLoss",
    "evalLoss",
    "tokensPerSecond",
    "checkpoint",
    "event",
)


def format_line(record: dict[str, Any]) -> str:
    return PREFIX + json.dumps(record, sort_keys=True, separators=(",", ":"))


def parse_line(line: str) -> dict[str, Any] | None:
    """The record in one log line, or None when the line is not a progress line."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        record = json.loads(line[start + len(PREFIX) :])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def last_record(lines: Iterable[str]) -> dict[str, Any] | None:
    last = None
    for line in lines:
        record = parse_line(line)
        if record is not None:
            last = record
    return last
