"""Every API call the operator makes, as RBAC rules: the Helm chart's (Cluster)Role grants
exactly these, and tests/test_operator_integration.py checks them against the calls the
operator really makes (from the API emulator's log)."""

from __future__ import annotations

from llmray_operator.resources import (
    CONFIGMAPS,
    EVENTS,
    FINETUNEJOBS,
    LLMDEPLOYMENTS,
    PODS,
    RAYJOBS,
    RAYSERVICES,
    Resource,
)


def _rule(res: Resource, verbs: tuple[str, ...], subresource: str = ""):
    return (res.group, f"{res.plural}/{subresource}" if subresource else res.plural, verbs)


# (API group, resource or resource/subresource, verbs), e.g. ("ray.io", "rayjobs", ("get",))
RULES: list[tuple[str, str, tuple[str, ...]]] = [
    # Its own resources: watched by kopf, annotations (kopf's progress), status by the pass.
    _rule(FINETUNEJOBS, ("get", "list", "watch", "patch")),
    _rule(LLMDEPLOYMENTS, ("get", "list", "watch", "patch")),
    _rule(FINETUNEJOBS, ("patch",), "status"),
    _rule(LLMDEPLOYMENTS, ("patch",), "status"),
    # Children with ownerReferences that set blockOwnerDeletion: the API server's
    # OwnerReferencesPermissionEnforcement admission needs `update` on the owner's finalizers.
    _rule(FINETUNEJOBS, ("update",), "finalizers"),
    _rule(LLMDEPLOYMENTS, ("update",), "finalizers"),
    _rule(RAYJOBS, ("get", "list", "watch", "create")),
    _rule(RAYSERVICES, ("get", "list", "watch", "create", "patch")),
    _rule(CONFIGMAPS, ("get", "create")),
    # Training progress: the last lines of KubeRay's submitter pod.
    _rule(PODS, ("list",)),
    _rule(PODS, ("get",), "log"),
    _rule(EVENTS, ("create",)),
]
# Needed on a real API server but never seen by the emulator (admission, not a request).
NOT_REQUESTED = {
    (FINETUNEJOBS.group, f"{FINETUNEJOBS.plural}/finalizers"),
    (LLMDEPLOYMENTS.group, f"{LLMDEPLOYMENTS.plural}/finalizers"),
}
