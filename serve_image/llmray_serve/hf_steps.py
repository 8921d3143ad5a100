"""The transformers engine's generation loop, one guarded and timed step at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from llmray_serve import hf_logits

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # steps failing in a row: the model or the device is broken


class GuardedSteps:
    """Each pass of transformers' generation loop, guarded and timed.

    transformers ends its generation loop at the first exception anywhere in a step (failing
    every request it holds), and then drops new requests without a word: one bad request took
    the replica down. Here a failed step fails the requests that were decoding in it (they
    shared its forward pass: which of them broke it cannot be told), logs why, and the loop
    goes on with the requests still waiting and every later one. The engine reports itself
    unhealthy (the replica's health check, so Ray Serve replaces it) when a step has run for
    longer than `stuck_after_s`, or when `MAX_FAILED_STEPS` steps in a row failed (the model
    or device is broken, not a request).
    """

    def __init__(self, stuck_after_s: float, between: Callable[[Any], None]) -> None:
        self.stuck_after_s = stuck_after_s
        self.between = between  # called with the batch processor before each step
        self.failed_in_a_row = 0
        self.failed = 0  # steps failed since the start
        self._step_started: float | None = None

    def install(self, manager: Any, logits: hf_logits.PerRequestLogits) -> None:
        body = manager._generation_loop_body  # a transformers upgrade that renames it fails here

        def guarded(processor: Any, bootstrapping: bool) -> bool:
            hf_logits.hook_sampler(processor, logits)
            self.between(processor)
            self._step_started = time.monotonic()
            passes = manager.current_batch  # transformers counts the passes that ran a batch
            try:
                go_on = body(processor, bootstrapping)
            except Exception as exc:
                log.exception("a generation step failed: its requests fail, the loop goes on")
                self.failed += 1
                self.failed_in_a_row += 1
                fail_active_requests(processor, exc)
                return True
            finally:
                self._step_started = None
            if manager.current_batch != passes:  # a batch ran (not an idle wait)
                self.failed_in_a_row = 0
            return go_on

        manager._generation_loop_body = guarded

    def trouble(self) -> str | None:
        """Why the loop cannot serve, or None."""
        started = self._step_started
        if started is not None and time.monotonic() - started > self.stuck_after_s:
            return f"the generation loop is stuck: a step has run for over {self.stuck_after_s:g} s"
        if self.failed_in_a_row >= MAX_FAILED_STEPS:
            return f"the generation loop failed its last {self.failed_in_a_row} steps"
        return None


def fail_active_requests(processor: Any, error: Exception) -> None:
    """Fail the requests in the KV cache (those of the failed step), free their blocks; the
    waiting ones stay queued. (transformers' own `fail_all_requests` also fails the waiting.)"""
    for state in list(processor.scheduler.active_requests.values()):
        processor._handle_request_error(error, state)
        processor.scheduler.finish_request(state.request_id)
