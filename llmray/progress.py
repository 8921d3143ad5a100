"""The machine-readable progress channel between the trainer and whoever watches it.

The trainer's driver (the RayJob entrypoint, or `llmray finetune`) prints one line per
progress record on stdout, which lands in the RayJob's job logs (Ray dashboard
`/api/jobs/<id>/logs`), and appends it to a JSON-lines file when asked::

    llmray-progress {"epoch": 0, "step": 12, "totalSteps": 50, "trainLoss": 2.31, ...}

A record carries the fields of `FineTuneJob.status.progress` (the `Progress` model: its
field names are the record's keys) plus `event` (step, checkpoint, resumed, preempted,
exported, evaluating, evaluated, failed), `time` and, on some events, `checkpoint` / `model`
URIs; `evaluated` carries `evaluation` (`{metric: value, baseline: {...}}`). The operator
mirrors the last record into `status.progress`, the latest checkpoint into
`status.latestCheckpoint` and the scores into `status.evaluation`. A `failed` record (the
driver's last line when it stops on an error) carries the `message` the operator puts into
the Failed condition. Pure and free of
torch and ray so the operator image can parse it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from llmray.api.finetunejob import EvaluationScores, Progress

PREFIX = "llmray-progress "


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


# Kept from the latest record carrying them when a later record has none.
_CARRIED = ("checkpoint", "evaluation")


def last_record(lines: Iterable[str]) -> dict[str, Any] | None:
    """The last record, carrying the latest `checkpoint` and `evaluation` of all of them (a
    later record names neither: the operator may read the log only after it)."""
    last = None
    carried: dict[str, Any] = {}
    for line in lines:
        record = parse_line(line)
        if record is not None:
            last = record
            carried.update({k: record[k] for k in _CARRIED if record.get(k)})
    if last is not None:
        last = {**carried, **{k: v for k, v in last.items() if v or k not in carried}}
    return last


def failure_of(text: str) -> str | None:
    """The message of the last `failed` record in `text`: a log, or a RayJob's status.message
    (KubeRay puts the driver's last log lines there, after Ray's own "Job entrypoint command
    failed with exit code 1, last available logs ..."), so the user reads the trainer's words,
    not 20,000 characters of log."""
    found = None
    for line in text.splitlines():
        record = parse_line(line)
        if record is not None and record.get("event") == "failed" and record.get("message"):
            found = str(record["message"])
    return found


def progress_of(record: Mapping[str, Any]) -> Progress:
    """The `status.progress` fields of a record; only those it carries with a usable value
    (a missing, null, mistyped or non-finite one is left unset, so the last known value stays:
    progress is best effort and a NaN loss must not make the status unwritable)."""
    fields = {
        key: value
        for key in Progress.model_fields
        if (value := record.get(key)) is not None
        and not (isinstance(value, float) and not math.isfinite(value))
    }
    try:
        return Progress.model_validate(fields)
    except ValidationError as exc:
        bad = {str(error["loc"][0]) for error in exc.errors()}
        return Progress.model_validate({k: v for k, v in fields.items() if k not in bad})


def evaluation_of(record: Mapping[str, Any]) -> EvaluationScores | None:
    """status.evaluation from a record's `evaluation` (None when it has none or it is not
    scores: a hand-edited or truncated line must not make the status unwritable)."""
    raw = record.get("evaluation")
    if not isinstance(raw, dict):
        return None
    try:
        scores = EvaluationScores.model_validate(raw)
    except ValidationError:
        return None
    values = [v for k, v in scores.model_dump().items() if k != "baseline"]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        return None
    return scores
