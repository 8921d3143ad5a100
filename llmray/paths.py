"""Where local runs keep their files (`llmray finetune` / `llmray serve` on one machine).

$LLMRAY_HOME (default ~/.llmray)
  runs/<job>/            Ray Train storage: checkpoints (when checkpointing.storageUri unset)
  runs/<job>/model/      exported model (when output.uri and checkpointing.storageUri unset;
                         else <storageUri>/<job>/model, see trainer_config.py)
  jobs/<job>/status.json FineTuneJob status of the last local run (fineTuneJobRef reads it)
  jobs/<job>/progress.jsonl
  cache/                 converted GGUF models, downloads
  ray.json               the Ray head `llmray up` keeps running (address, dashboard), which
                         local commands join; removed by `llmray down` (see localray.py)

Pods have fixed paths instead (the operator mounts them): /etc/llmray (the trainer config),
/tmp/llmray (downloads), /mnt/llmray/pvc/CLAIM. `pod_path` is how the trainer and the server
open them; $LLMRAY_POD_ROOT roots them elsewhere when a pod's files are not at / (the KubeRay
replay of the tests runs several pods on one machine, each under its own root).
"""

from __future__ import annotations

import os
from pathlib import Path

POD_ROOT_ENV = "LLMRAY_POD_ROOT"  # e.g. LLMRAY_POD_ROOT=/tmp/replay/pods/job-head


def pod_path(path: str | Path) -> Path:
    """An absolute pod path (/etc/llmray/trainer.json) where this process finds it: as is in a
    pod, under $LLMRAY_POD_ROOT when that is set. Relative paths stay as they are."""
    path = Path(path)
    root = os.environ.get(POD_ROOT_ENV)
    if not root or not path.is_absolute():
        return path
    return Path(root) / path.relative_to(path.anchor)


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
