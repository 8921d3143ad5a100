"""Names and labels of the children: deterministic, so a restarted operator finds them."""

from __future__ import annotations

import hashlib

# KubeRay derives pod and service names from a RayJob / RayService name and rejects names
# over 47 characters.
RAY_NAME_MAX = 47
MANAGED_BY = {"app.kubernetes.io/managed-by": "llmray"}
# Of our label and annotation keys, e.g. llmray.io/spec-hash, and kopf's bookkeeping
# annotations, e.g. llmray.io/last-handled-configuration.
PREFIX = "llmray.io"
FINETUNEJOB_LABEL = f"{PREFIX}/finetunejob"  # e.g. llmray.io/finetunejob: gsm8k-7b
LLMDEPLOYMENT_LABEL = f"{PREFIX}/llmdeployment"  # e.g. llmray.io/llmdeployment: gsm8k-7b
COMPONENT_LABEL = f"{PREFIX}/component"  # on Ray pods, e.g. llmray.io/component: finetune


def ray_name(name: str) -> str:
    """`name` itself when it fits; else a prefix plus a stable 8-character hash of it."""
    if len(name) <= RAY_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: RAY_NAME_MAX - 9].rstrip('-')}-{digest}"


def config_map_name(name: str) -> str:
    return f"{ray_name(name)}-trainer"


def labels(owner_label: str, owner: str, component: str) -> dict[str, str]:
    return {
        **MANAGED_BY,
        "app.kubernetes.io/name": "llmray",
        "app.kubernetes.io/component": component,
        owner_label: owner,
    }


def volume_name(prefix: str, claim: str) -> str:
    """A DNS-1123 label for a volume, e.g. pvc-datasets (hashed when too long)."""
    name = f"{prefix}-{claim}".replace(".", "-")
    if len(name) <= 63:
        return name
    return f"{name[:54].rstrip('-')}-{hashlib.sha256(claim.encode()).hexdigest()[:8]}"


def pod_labels(owner_label: str, owner: str, component: str) -> dict[str, str]:
    """Labels of Ray pods: KubeRay owns the app.kubernetes.io/* ones there."""
    return {owner_label: owner, COMPONENT_LABEL: component}
