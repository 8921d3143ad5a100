"""Fault injection for the API emulator: a busy, flaky API server, on a share of requests.

    kube.faults = Faults(seed=7, throttle=0.03, error=0.03, conflict=0.05, watch_drop=5.0)

- ``throttle``: 429 Too Many Requests with ``Retry-After: 1`` (API priority and fairness);
- ``error``: 500 Internal Server Error, half of them *after* the request took effect (the
  response was lost: a client must not assume a failed create or patch did nothing);
- ``conflict``: 409 Conflict on writes (create, update, patch), before they take effect;
- ``watch_drop``: every watch stream is cut (its connection closed, no clean end) after a
  random time up to this many seconds, as a restarting apiserver or a load balancer does.

Only requests that arrive over HTTP (the operator's) are affected, never the test's own calls
(``apply_object``, ``patch_status``); ``injected`` counts what was injected, by kind.
"""

from __future__ import annotations

import collections
import random
from typing import NamedTuple

import attrs

WRITES = ("create", "update", "patch")


class Fault(NamedTuple):
    code: int  # 429, 500 or 409
    after: bool  # True: the request took effect, only its response is lost


@attrs.define(kw_only=True)
class Faults:
    seed: int = 0
    throttle: float = 0.0
    error: float = 0.0
    conflict: float = 0.0
    watch_drop: float | None = None
    enabled: bool = True
    injected: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _random: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def draw(self, verb: str) -> Fault | None:
        """The fault for one (non-watch) request of RBAC verb `verb`, if any."""
        if not self.enabled:
            return None
        roll = self._random.random()
        if roll < self.throttle:
            return self._count(Fault(429, after=False), "throttle")
        roll -= self.throttle
        if roll < self.error:
            after = verb in WRITES and self._random.random() < 0.5
            return self._count(Fault(500, after=after), "error-after" if after else "error")
        roll -= self.error
        if verb in WRITES and roll < self.conflict:
            return self._count(Fault(409, after=False), "conflict")
        return None

    def watch_lifetime(self) -> float | None:
        """Seconds until a new watch stream is cut, or None to leave it alone."""
        if not self.enabled or self.watch_drop is None:
            return None
        return self._random.uniform(0.1, self.watch_drop)

    def count_drop(self) -> None:
        self.injected["watch-drop"] += 1

    def _count(self, fault: Fault, kind: str) -> Fault:
        self.injected[kind] += 1
        return fault


REASONS: dict[int, tuple[str, str]] = {
    429: ("TooManyRequests", "the server is handling too many requests (injected fault)"),
    500: ("InternalError", "an internal error occurred (injected fault)"),
    409: ("Conflict", "the object has been modified; please apply your changes (injected fault)"),
}
