"""spec.maxRetries as one budget, however a failed run is restarted.

Two layers restart a failed run, each from the latest checkpoint: the driver here (a worker
failed: a new Ray Train run of the same name) and, on Kubernetes, KubeRay (the cluster or the
driver was lost: a new cluster and a new driver, up to the RayJob's backoffLimit). Counted apart,
they multiply: `maxRetries: 1` would mean up to four runs. So the count of starts lives in the
run's storage, beside its checkpoints, which a new cluster finds again:

    <storage>/<run>/llmray-attempts.json   {"run_id": "<FineTuneJob uid>", "attempts": 2}

`run_id` tells KubeRay's retry of one job (same id: the count goes on) from a new job or a new
`llmray finetune` of the same name (a new id: the count starts again). A restart after a
preemption is no attempt: maxRetries is for failures.
"""

from __future__ import annotations

import json
import logging
import posixpath

log = logging.getLogger("llmray.trainer")

ATTEMPTS_FILE = "llmray-attempts.json"


class RetriesUsedUp(RuntimeError):
    """The run failed once more than spec.maxRetries allows."""


class RetryBudget:
    """Starts of one run, counted in `<storage>/<run>/llmray-attempts.json` (fsspec: a local
    folder, s3://, gs://). With no run_id the count is this process's alone."""

    def __init__(self, storage: str, run: str, run_id: str, max_retries: int) -> None:
        self.path = posixpath.join(storage.rstrip("/"), run, ATTEMPTS_FILE)
        self.run_id = run_id
        self.max_retries = max_retries
        self.attempts = 0

    def start(self, reason: BaseException | None = None) -> None:
        """Count one more start; raise RetriesUsedUp (from `reason`, the failure that asks
        for it) when that would be more than 1 + max_retries."""
        used = max(self.attempts, self._read())
        if used > self.max_retries:
            # The failure first: the FineTuneJob's Failed condition keeps a message's start.
            raise RetriesUsedUp(
                f"{reason or 'the previous attempt ended without finishing'}\n(gave up after "
                f"{used} attempts: spec.maxRetries is {self.max_retries})"
            ) from reason
        if used:
            log.warning(
                "restart %d of spec.maxRetries=%d, from the latest checkpoint%s",
                used,
                self.max_retries,
                f" (after: {reason})" if reason else "",
            )
        self.attempts = used + 1
        self._write(self.attempts)

    def _read(self) -> int:
        if not self.run_id:
            return 0
        fs, path = _fs(self.path)
        if not fs.exists(path):
            return 0
        try:
            record = json.loads(fs.cat_file(path))
        except ValueError:  # a torn write: count from what this process knows
            return 0
        return int(record.get("attempts", 0)) if record.get("run_id") == self.run_id else 0

    def _write(self, attempts: int) -> None:
        if not self.run_id:
            return
        fs, path = _fs(self.path)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, json.dumps({"run_id": self.run_id, "attempts": attempts}).encode())


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)
