"""Where the training workers go: world rank 0 on the Ray node with the rank-0 label.

Ray Train 2.60 gives world rank 0 to placement bundle 0, so the label is bundle 0's selector
in `ScalingConfig(label_selector=...)`. A selector no node satisfies does not fail there:
Ray Train waits 60 s for the worker group, counts the startup timeout as no failure, and
tries again, forever (the KubeRay replay found it: a RayJob whose rank-0 group had lost its
`labels:` stayed RUNNING, and the check in the training loop never ran). So the driver looks
for such a node first and fails in seconds with a message that says what to fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# How long the driver waits for the rank-0 node to join. KubeRay submits the job once every
# pod is running, so the node is normally there already; this covers a raylet still
# registering.
RANK0_NODE_WAIT_SECONDS = 30.0


class PlacementError(RuntimeError):
    """The cluster has no node where rank 0 can run."""


def label_selector(rank0_label: dict[str, str], workers: int) -> list[dict[str, str]] | None:
    """Bundle 0 (world rank 0) on the labelled node, the others anywhere."""
    if not rank0_label:
        return None
    return [dict(rank0_label)] + [{} for _ in range(workers - 1)]


def rank0_node_error(
    nodes: list[dict[str, Any]], label: dict[str, str], resources: dict[str, float]
) -> str | None:
    """Why no node of `nodes` (as `ray.nodes()` lists them) can hold rank 0; None if one can."""
    alive = [n for n in nodes if n.get("Alive")]
    labelled = [n for n in alive if _has_labels(n.get("Labels") or {}, label)]
    if any(_fits(n.get("Resources") or {}, resources) for n in labelled):
        return None
    want = ", ".join(f"{k}={v}" for k, v in sorted(label.items()))
    seen = "; ".join(_describe(n) for n in alive) or "none"
    return (
        f"rank 0 needs a Ray node with the label {want} and room for one worker "
        f"({_format(resources)}); no such node joined the cluster within "
        f"{RANK0_NODE_WAIT_SECONDS:.0f} s (nodes: {seen}). The rank-0 worker group carries "
        "that label in its `labels:`; check spec.compute.rank0 and the RayJob's rank-0 group."
    )


def wait_for_rank0_node(
    label: dict[str, str],
    resources: dict[str, float],
    *,
    nodes: Callable[[], list[dict[str, Any]]] | None = None,
    timeout: float = RANK0_NODE_WAIT_SECONDS,
    poll: float = 1.0,
) -> None:
    """Return once a node can hold rank 0; raise PlacementError after `timeout`."""
    if not label:
        return
    if nodes is None:
        import ray

        nodes = ray.nodes
    deadline = time.monotonic() + timeout
    while True:
        error = rank0_node_error(nodes(), label, resources)
        if error is None:
            return
        if time.monotonic() >= deadline:
            raise PlacementError(error)
        time.sleep(poll)


def _has_labels(have: dict[str, Any], want: dict[str, str]) -> bool:
    return all(value == have.get(key) for key, value in want.items())


def _fits(total: dict[str, float], need: dict[str, float]) -> bool:
    return all(total.get(name, 0) >= amount for name, amount in need.items())


def _describe(node: dict[str, Any]) -> str:
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    resources = {k: v for k, v in (node.get("Resources") or {}).items() if k in ("CPU", "GPU")}
    return f"labels {labels or '{}'}, {_format(resources) or 'no CPU'}"


def _format(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()))
