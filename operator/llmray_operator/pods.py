"""Pod template pieces shared by the RayJob and RayService builders (pure)."""

from __future__ import annotations

from typing import Any

from llmray import uris
from llmray.api.common import EnvVar, Resources, SecretRef, Toleration
from llmray_operator import security
from llmray_operator.names import volume_name
from llmray_operator.settings import Settings

CACHE_DIR = "/tmp/llmray"  # downloads and converted models, an emptyDir per pod
CACHE_VOLUME = {"name": "llmray-cache", "emptyDir": {}}
CACHE_MOUNT = {"name": "llmray-cache", "mountPath": CACHE_DIR}
HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
]
# Ray Serve's HTTP port on every serving pod (HAProxy or Ray's proxy listens there); KubeRay's
# <rayservice>-serve-svc forwards to the container port named "serve".
SERVE_PORT = 8000
SERVE_CONTAINER_PORT = {"name": "serve", "containerPort": SERVE_PORT}


def pvc_claims(uri_values: list[str | None]) -> list[str]:
    """Claims named by pvc:// URIs, each once, in order of first mention."""
    claims: list[str] = []
    for value in uri_values:
        if value and value.startswith("pvc://"):
            claim = uris.parse(value).authority
            if claim not in claims:
                claims.append(claim)
    return claims


def pvc_volumes(
    inputs: list[str | None], outputs: list[str | None] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts so that pvc://CLAIM/path is $LLMRAY_PVC_ROOT/CLAIM/path in the pod.
    A claim only read from (`inputs`: the base model, the dataset) is mounted read-only; one
    written to (`outputs`: checkpoints, the model) is writable, also when it is read too."""
    writable = set(pvc_claims(list(outputs)))
    volumes, mounts = [], []
    for claim in pvc_claims([*inputs, *outputs]):
        name = volume_name("pvc", claim)
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mount: dict[str, Any] = {"name": name, "mountPath": f"{uris.DEFAULT_PVC_ROOT}/{claim}"}
        if claim not in writable:
            mount["readOnly"] = True
        mounts.append(mount)
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
    """The operator's variables, then the user's spec.env (which may not repeat a name of
    the first: `policy.env_errors`)."""
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
    lifecycle: dict[str, Any] | None = None,
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
    if lifecycle:
        c["lifecycle"] = lifecycle
    return c


def pod_template(
    *,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    settings: Settings,
    node_selector: dict[str, str] | None = None,
    tolerations_: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    restart_policy: str | None = None,
    termination_grace_seconds: int | None = None,
) -> dict[str, Any]:
    """A Ray pod: `container` with the scratch volumes, the security contexts of PodSecurity
    "restricted" (security.py), the ServiceAccount and the image pull secrets of every Ray pod
    (chart rayPods.*)."""
    memory = container["resources"].get("limits", {}).get("memory")
    scratch_volumes, scratch_mounts = security.scratch(memory)
    container = {
        **container,
        "volumeMounts": [*scratch_mounts, *container["volumeMounts"]],
        "securityContext": security.container_security_context(
            settings.ray_fixed_user, settings.ray_read_only_root_filesystem
        ),
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [*scratch_volumes, *volumes],
        "securityContext": security.pod_security_context(settings.ray_fixed_user),
        # Ray never calls the Kubernetes API: no token unless a ServiceAccount was named (for
        # workload identity, whose clients read the token).
        "automountServiceAccountToken": bool(settings.ray_service_account),
    }
    if settings.ray_service_account:
        spec["serviceAccountName"] = settings.ray_service_account
    if settings.ray_image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in settings.ray_image_pull_secrets]
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if termination_grace_seconds is not None:
        spec["terminationGracePeriodSeconds"] = termination_grace_seconds
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations_:
        spec["tolerations"] = tolerations_
    template: dict[str, Any] = {"spec": spec}
    if labels:
        template["metadata"] = {"labels": dict(labels)}
    return template
