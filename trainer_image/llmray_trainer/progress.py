"""Progress from rank 0 to the driver: a tiny Ray actor as the channel.

Rank 0 pushes a record after each logged step (fire-and-forget, no barrier, unlike
`ray.train.report`); the driver polls the actor and renders it: a tqdm bar on a terminal,
`llmray-progress {...}` lines otherwise (the RayJob's logs, which the operator reads), and a
JSON-lines file for local runs (see `llmray.progress`).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import ray

from llmray.metrics import summary
from llmray.progress import format_line


@ray.remote(num_cpus=0)
class ProgressSink:
    """Holds the records rank 0 pushed; the driver drains them."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def drain(self, start: int) -> list[dict[str, Any]]:
        return self._records[start:]


class ProgressWatcher:
    """Driver side: polls the sink in a thread until stopped, renders every record."""

    def __init__(self, sink: Any, progress_file: str = "", tty: bool | None = None) -> None:
        self.sink = sink
        self.progress_file = Path(progress_file) if progress_file else None
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar: Any = None

    def __enter__(self) -> ProgressWatcher:
        if self.progress_file:
            self.progress_file.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # what arrived after the last poll
        if self._bar is not None:
            self._bar.close()

    def add(self, record: dict[str, Any]) -> None:
        """A record of the driver's own (evaluation), rendered as the workers' are."""
        self._poll()  # keep the order: what the workers sent first
        self.records.append(record)
        self._render(record)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        try:
            new = ray.get(self.sink.drain.remote(len(self.records)), timeout=10)
        except Exception:  # the sink died with the cluster: nothing more to show
            return
        for record in new:
            self.records.append(record)
            self._render(record)

    def _render(self, record: dict[str, Any]) -> None:
        if self.progress_file:
            with self.progress_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if not self.tty:
            print(format_line(record), flush=True)
            return
        event = record.get("event")
        if event == "evaluating":
            print(f"evaluating {record['model']} on {record['records']} records", file=sys.stderr)
        if event == "evaluated":
            print(f"evaluation: {summary(record['evaluation'])}", file=sys.stderr)
        if event != "step":
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=record.get("totalSteps") or None,
                unit="step",
                desc="fine-tuning",
                dynamic_ncols=True,
            )
        self._bar.n = record["step"]
        postfix = {
            "loss": f"{record['trainLoss']:.4f}",
            "tok/s": f"{record['tokensPerSecond']:.0f}",
        }
        if record.get("evalLoss") is not None:
            postfix["eval"] = f"{record['evalLoss']:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()
