"""Pod template pieces shared by the RayJob and RayService builders (pure)."""

from __future__ import annotations

from typing import Any

from llmray import uris
from llmray.api.common import EnvVar, Resources, SecretRef, Toleration
from llmray_operator.names import volume_name

SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}  # NCCL, gloo and DataLoader use it
CACHE_DIR = "/tmp/llmray"  # downloads and converted models, an emptyDir per pod
CACHE_VOLUME = {"name": "llmray-cache", "emptyDir": {}}
CACHE_MOUNT = {"name": "llmray-cache", "mountPath": CACHE_DIR}
HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
]
SERVE_PORT = {"name": "serve", "containerPort": 8000}


def pvc_claims(uri_values: list[str | None]) -> list[str]:
    """Claims named by pvc:// URIs, each once, in order of first mention."""
    claims: list[str] = []
    for value in uri_values:
        if value and value.startswith("pvc://"):
            claim = uris.parse(value).authority
            if claim not in claims:
                claims.append(claim)
    return claims


def pvc_volumes(claims: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts so that pvc://CLAIM/path is $LLMRAY_PVC_ROOT/CLAIM/path in the pod."""
    volumes, mounts = [], []
    for claim in claims:
        name = volume_name("pvc", claim)
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": name, "mountPath": f"{uris.DEFAULT_PVC_ROOT}/{claim}"})
    return volumes, mounts


def container_resources(
    cpu: int | str, memory: int | str | None, devices: int = 0, device_resource: str | None = None
) -> dict[str, Any]:
    """Requests = limits: Ray reads its CPU count from the limit, and training wants
    guaranteed cores (an oversubscribed node made one measured run 11x slower)."""
    amounts: dict[str, Any] = {"cpu": str(cpu)}
    if memory is not None:
        amounts["memory"] = str(memory)
    limits = dict(amounts)
    if devices and device_resource:
        limits[device_resource] = devices
    return {"requests": amounts, "limits": limits}


def worker_resources(res: Resources, device_resource: str | None) -> dict[str, Any]:
    return container_resources(res.cpu, res.memory, res.gpu, device_resource)


def env_list(fixed: dict[str, str], user: list[EnvVar] = ()) -> list[dict[str, Any]]:
    """Fixed variables first; the user's spec.env last, so theirs win (later entries do)."""
    out = [{"name": k, "value": v} for k, v in sorted(fixed.items())]
    out += [var.model_dump(exclude_none=True) for var in user]
    return out


def env_from(secret_refs: list[SecretRef | None]) -> list[dict[str, Any]]:
    """Secrets by reference only: their keys become variables, values never pass through us."""
    return [{"secretRef": {"name": ref.name}} for ref in secret_refs if ref is not None]


def tolerations(items: list[Toleration]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in items]


def container(
    name: str,
    *,
    image: str,
    pull_policy: str,
    env: list[dict[str, Any]],
    env_from: list[dict[str, Any]],
    resources: dict[str, Any],
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": pull_policy,
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
    }
    if env_from:
        c["envFrom"] = env_from
    if ports:
        c["ports"] = ports
    return c


def pod_template(
    *,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    node_selector: dict[str, str] | None = None,
    tolerations_: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations_:
        spec["tolerations"] = tolerations_
    template: dict[str, Any] = {"spec": spec}
    if labels:
        template["metadata"] = {"labels": dict(labels)}
    return template


def apply_pod_settings(cluster: dict[str, Any], service_account: str, pull_secrets) -> None:
    """The ServiceAccount and image pull secrets of every Ray pod (head and all groups)."""
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        spec = group["template"]["spec"]
        if service_account:
            spec["serviceAccountName"] = service_account
        if pull_secrets:
            spec["imagePullSecrets"] = [{"name": name} for name in pull_secrets]
