"""What KubeRay 1.7 makes of a RayCluster spec: one pod per head / worker replica, each with
the `ray start` parameters and the environment KubeRay gives its Ray container (pure).

The rules are KubeRay's (ray-operator/controllers/ray/common/pod.go at v1.7.0):
- `rayStartParams` as written, then the group's `resources:` map and `labels:` (as
  `--labels k=v,...`, keys sorted), then what is missing: `num-cpus` from the container's CPU
  limit (else request, rounded up), `memory` from its memory limit (bytes), `num-gpus` from a
  limit whose name ends in "gpu" (nvidia.com/gpu, not gpu.intel.com/i915), `address` for
  workers, `dashboard-host`, `metrics-export-port`, `dashboard-agent-listen-port`, `block`;
- the container's `env` and `envFrom` (values, Secrets, ConfigMaps, the downward API), then
  what KubeRay adds: RAY_ADDRESS, RAY_CLUSTER_NAME / _NAMESPACE, RAY_CLOUD_INSTANCE_ID,
  RAY_NODE_TYPE_NAME, RAY_USAGE_STATS_KUBERAY_IN_USE, the RayService timeouts, and with
  `authOptions.mode: token` RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret KubeRay
  generates (named after the RayCluster, key `auth_token`).

Where one machine differs from a cluster (every listening port is a free one, nodes bind
127.0.0.1, pod paths live under a root per pod) is left to `nodes.py`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from llmray.api.quantity import parse_quantity

AUTH_SECRET_KEY = "auth_token"  # KubeRay's RAY_AUTH_TOKEN_SECRET_KEY
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_METRICS_PORT = 8080
DEFAULT_AGENT_LISTEN_PORT = 52365


def quantity(value: int | str) -> Decimal:
    return parse_quantity(value if isinstance(value, int | str) else str(value))


def quantity_value(value: int | str) -> int:
    """resource.Quantity.Value(): rounded up to a whole number."""
    return math.ceil(quantity(value))


@dataclass(frozen=True)
class Pod:
    """One Ray pod KubeRay would create."""

    name: str  # e.g. tiny-raycluster-x7k2p-rank0-worker-0
    group: str  # "headgroup" or the worker group's name
    head: bool
    container: dict[str, Any]  # the Ray container (index 0 of the template)
    volumes: list[dict[str, Any]]
    start_params: dict[str, str]  # rayStartParams as KubeRay completes them
    node_selector: dict[str, str] = field(default_factory=dict)


def cluster_pods(cluster: dict[str, Any], cluster_name: str) -> list[Pod]:
    """The head and every replica of every worker group (`replicas`, as KubeRay starts them;
    the autoscaler, when enabled, is not replayed)."""
    head = cluster["headGroupSpec"]
    pods = [_pod(f"{cluster_name}-head", "headgroup", head, head=True, head_name=cluster_name)]
    for group in cluster.get("workerGroupSpecs") or []:
        if group.get("suspend"):
            continue
        replicas = group.get("replicas", group.get("minReplicas", 0)) or 0
        hosts = group.get("numOfHosts", 1) or 1
        for i in range(replicas * hosts):
            name = f"{cluster_name}-{group['groupName']}-worker-{i}"
            pods.append(_pod(name, group["groupName"], group, head=False, head_name=cluster_name))
    return pods


def _pod(name: str, group_name: str, group: dict, *, head: bool, head_name: str) -> Pod:
    spec = group["template"]["spec"]
    container = spec["containers"][0]
    return Pod(
        name=name,
        group=group_name,
        head=head,
        container=container,
        volumes=list(spec.get("volumes") or []),
        start_params=start_params(group, container, head=head, head_service=head_name),
        node_selector=dict(spec.get("nodeSelector") or {}),
    )


def start_params(
    group: dict[str, Any], container: dict[str, Any], *, head: bool, head_service: str
) -> dict[str, str]:
    """`rayStartParams` completed as KubeRay 1.7 does before it writes `ray start`."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    _apply_group_resources(params, group.get("resources") or {})
    labels = group.get("labels") or {}
    if labels:
        params["labels"] = ",".join(f"{k}={labels[k]}" for k in sorted(labels))
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu is not None and quantity(cpu) != 0:
            params["num-cpus"] = str(quantity_value(cpu))
    if "memory" not in params and limits.get("memory") is not None:
        params["memory"] = str(quantity_value(limits["memory"]))
    if "num-gpus" not in params:
        for key in sorted(limits):
            if key.endswith("gpu") and quantity(limits[key]) != 0:
                params["num-gpus"] = str(quantity_value(limits[key]))
                break
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    else:
        params.setdefault("address", f"{head_service}-head-svc:{DEFAULT_GCS_PORT}")
    params.setdefault("metrics-export-port", str(DEFAULT_METRICS_PORT))
    params.setdefault("dashboard-agent-listen-port", str(DEFAULT_AGENT_LISTEN_PORT))
    params["block"] = "true"
    return params


def _apply_group_resources(params: dict[str, str], resources: dict[str, str]) -> None:
    custom: dict[str, float] = {}
    for name, value in resources.items():
        lower = name.lower()
        if lower == "cpu":
            params["num-cpus"] = str(quantity_value(value))
        elif lower == "memory":
            params["memory"] = str(quantity_value(value))
        elif lower.endswith("gpu"):
            params["num-gpus"] = str(quantity_value(value))
        else:
            custom[name] = float(quantity(value))
    if custom:
        params["resources"] = json.dumps(custom)


def ray_start_args(params: dict[str, str]) -> list[str]:
    """`ray start` flags from the parameters, as KubeRay's convertParamMap writes them
    (sorted; "true" is a bare flag, "false" drops it)."""
    args = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in (
            "log-color",
            "include-dashboard",
            "include-log-monitor",
        ):
            if value.lower() == "true":
                args.append(f"--{key}")
        else:
            args.append(f"--{key}={value.strip(chr(39))}")
    return args


class MissingReference(LookupError):
    """An env var or volume names a Secret / ConfigMap key that the replay was not given
    (a pod would not start: CreateContainerConfigError)."""


def container_env(
    pod: Pod,
    *,
    namespace: str,
    secrets: dict[str, dict[str, str]],
    config_maps: dict[str, dict[str, str]],
    pod_labels: dict[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet resolves it: envFrom first, then env in
    order (later entries win, `$(VAR)` references expanded as Kubernetes does)."""
    c = pod.container
    env: dict[str, str] = {}
    for source in c.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            data = _lookup(secrets, source["secretRef"], "Secret")
        else:
            data = _lookup(config_maps, source["configMapRef"], "ConfigMap")
        env.update({prefix + k: v for k, v in data.items()})
    meta = {"metadata.name": pod.name, "metadata.namespace": namespace, "status.podIP": ""}
    for key, value in (pod_labels or {}).items():
        meta[f"metadata.labels['{key}']"] = value
    for var in c.get("env") or []:
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
            continue
        source = var.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = _key(secrets, ref, "Secret")
        elif "configMapKeyRef" in source:
            value = _key(config_maps, source["configMapKeyRef"], "ConfigMap")
        elif "fieldRef" in source:
            value = meta.get(source["fieldRef"]["fieldPath"], "")
        else:
            value = ""
        if value is not None:
            env[var["name"]] = value
    return env


def kuberay_env(
    pod: Pod, *, cluster_name: str, namespace: str, gcs_address: str, service: bool
) -> dict[str, str]:
    """What KubeRay's setContainerEnvVars adds (only where the container has not set it)."""
    env = {
        "RAY_CLUSTER_NAME": cluster_name,
        "RAY_CLUSTER_NAMESPACE": namespace,
        "RAY_CLOUD_INSTANCE_ID": pod.name,
        "RAY_NODE_TYPE_NAME": pod.group,
        "RAY_ADDRESS": gcs_address,
        "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
        "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1",
    }
    if service:
        env.update(
            {
                "RAY_TIMEOUT_MS_TASK_WAIT_FOR_DEATH_INFO": "0",
                "RAY_GCS_SERVER_REQUEST_TIMEOUT_SECONDS": "5",
                "RAY_SERVE_KV_TIMEOUT_S": "5",
            }
        )
    return env


def auth_env(cluster: dict[str, Any], token: str) -> dict[str, str]:
    """authOptions.mode token: every Ray container (and the submitter) gets the mode and the
    token from the Secret `<raycluster>` (or authOptions.secretName), key auth_token."""
    mode = (cluster.get("authOptions") or {}).get("mode")
    if mode != "token":
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def _lookup(store: dict[str, dict[str, str]], ref: dict[str, Any], kind: str) -> dict[str, str]:
    name = ref["name"]
    if name not in store:
        if ref.get("optional"):
            return {}
        raise MissingReference(f"{kind} {name} not found")
    return store[name]


def _key(store: dict[str, dict[str, str]], ref: dict[str, Any], kind: str) -> str | None:
    data = _lookup(store, ref, kind)
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise MissingReference(f"{kind} {ref['name']} has no key {ref['key']}")
    return data[ref["key"]]


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) -> its value when VAR is defined earlier; $$ escapes (Kubernetes' rules)."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)
