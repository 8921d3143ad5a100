"""Where local runs keep their files (`llmray finetune` / `llmray serve` on one machine).

$LLMRAY_HOME (default ~/.llmray)
  runs/<job>/            Ray Train storage: checkpoints (when checkpointing.storageUri unset)
  jobs/<job>/model/      exported model (when output.uri unset)
  jobs/<job>/status.json FineTuneJob status of the last local run (fineTuneJobRef reads it)
  jobs/<job>/progress.jsonl
  cache/                 converted GGUF models, downloads
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("LLMRAY_HOME") or Path.home() / ".llmray").expanduser()


def runs_dir() -> Path:
    return home() / "runs"


def job_dir(name: str) -> Path:
    return home() / "jobs" / name


def cache_dir() -> Path:
    return home() / "cache"


def job_status(name: str) -> dict | None:
    """The status.json `llmray finetune` wrote for job `name` (None if it never ran here)."""
    import json

    path = job_dir(name) / "status.json"
    return json.loads(path.read_text()) if path.exists() else None
