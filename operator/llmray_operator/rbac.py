"""Every API call the operator makes, as RBAC rules: the Helm chart's (Cluster)Role grants
exactly these, and tests/test_operator_integration.py checks them against the calls the
operator really makes (from the API emulator's log)."""

from __future__ import annotations

# (API group, resource or resource/subresource, verbs)
RULES: list[tuple[str, str, tuple[str, ...]]] = [
    # Its own resources: watched by kopf, annotations (kopf's progress), status by the pass.
    ("llmray.io", "finetunejobs", ("get", "list", "watch", "patch")),
    ("llmray.io", "llmdeployments", ("get", "list", "watch", "patch")),
    ("llmray.io", "finetunejobs/status", ("patch",)),
    ("llmray.io", "llmdeployments/status", ("patch",)),
    # Children with ownerReferences that set blockOwnerDeletion: the API server's
    # OwnerReferencesPermissionEnforcement admission needs `update` on the owner's finalizers.
    ("llmray.io", "finetunejobs/finalizers", ("update",)),
    ("llmray.io", "llmdeployments/finalizers", ("update",)),
    ("ray.io", "rayjobs", ("get", "list", "watch", "create")),
    ("ray.io", "rayservices", ("get", "list", "watch", "create", "patch")),
    ("", "configmaps", ("get", "create")),
    # Training progress: the last lines of KubeRay's submitter pod.
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
    ("", "events", ("create",)),
]
# Needed on a real API server but never seen by the emulator (admission, not a request).
NOT_REQUESTED = {
    ("llmray.io", "finetunejobs/finalizers"),
    ("llmray.io", "llmdeployments/finalizers"),
}
