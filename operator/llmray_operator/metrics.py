"""Prometheus metrics of the operator (served on --metrics-port, default 8080 at /metrics)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

RECONCILES = Counter(
    "llmray_reconciles",
    "Reconcile passes by kind and result (ok, invalid, error).",
    ["kind", "result"],
)
RECONCILE_SECONDS = Histogram(
    "llmray_reconcile_seconds",
    "Time of one reconcile pass, API calls included.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class PhaseBook:
    """The last phase written for every object, exported as llmray_objects{kind,phase}."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str, str], str] = {}

    def set(self, kind: str, namespace: str, name: str, phase: str) -> None:
        self.phases[(kind, namespace, name)] = phase

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.phases.pop((kind, namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "llmray_objects", "FineTuneJobs and LLMDeployments by phase.", labels=["kind", "phase"]
        )
        for (kind, phase), count in sorted(
            Tally((kind, phase) for (kind, _, _), phase in self.phases.items()).items()
        ):
            family.add_metric([kind, phase], count)
        yield family


PHASES = PhaseBook()
REGISTRY.register(PHASES)
