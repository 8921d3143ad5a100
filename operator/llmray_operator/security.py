"""PodSecurity "restricted" for every Ray pod the operator creates (pure).

The Pod Security Standards' restricted profile (kubernetes.io/docs/concepts/security/
pod-security-standards/) asks of every container: no privilege escalation, all capabilities
dropped, a non-root numeric user, the RuntimeDefault seccomp profile; and of the pod only the
allowed volume types (ours: configMap, emptyDir, persistentVolumeClaim). On top of it:

- the Ray images' user `ray` (uid 1000, gid 100 `users`; fsGroup 100 so that volumes are
  group-writable for it), unless the cluster assigns users itself (`fixed_user` off, as on
  OpenShift's restricted-v2);
- a read-only root file system: the pod writes only to its emptyDir volumes, /tmp (Ray's
  temp dir /tmp/ray -- sockets, session logs, spilled objects -- and torch.compile's cache
  are there), ~/.cache (DeepSpeed's and torch's JIT-built extensions, pip), /dev/shm;
- no ServiceAccount token in the pod unless a ServiceAccount was named for Ray pods (Ray
  never calls the Kubernetes API; a named one is there for workload identity), or the pod is
  the head of an autoscaling RayService (KubeRay's autoscaler container scales through it).

Both security contexts go on the container as well as the pod: KubeRay copies the Ray
container's securityContext and volumeMounts to the init container it injects into worker
pods (wait-gcs-ready), so that one complies too.
"""

from __future__ import annotations

from typing import Any

# The Ray images' user `ray` and its group `users` (rayproject/ray: uid 1000, gid 100).
RAY_UID = 1000
RAY_GID = 100
HOME = "/home/ray"
# Scratch space of a pod whose root file system is read-only: (volume, mount path).
TMP = ("tmp", "/tmp")
CACHE = ("home-cache", f"{HOME}/.cache")
SHM = ("dshm", "/dev/shm")  # NCCL, gloo, DataLoader workers and Ray's object store use it
SCRATCH = (TMP, CACHE)


def pod_security_context(fixed_user: bool) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if fixed_user:
        context |= {"runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID}
    return context


def container_security_context(fixed_user: bool, read_only_root: bool) -> dict[str, Any]:
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if fixed_user:
        context |= {"runAsUser": RAY_UID, "runAsGroup": RAY_GID}
    return context


def shm_volume(memory: str | int | None) -> dict[str, Any]:
    """Memory-backed /dev/shm bounded by the pod's memory limit: its pages are charged to
    that limit anyway, and Ray puts its object store there (30% of memory by default), so a
    smaller bound would starve it. KubeRay sizes the /dev/shm it adds itself the same way."""
    empty_dir: dict[str, Any] = {"medium": "Memory"}
    if memory is not None:
        empty_dir["sizeLimit"] = str(memory)
    return {"name": SHM[0], "emptyDir": empty_dir}


def scratch(memory: str | int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The emptyDir volumes and mounts every Ray pod gets."""
    volumes = [shm_volume(memory), *({"name": name, "emptyDir": {}} for name, _ in SCRATCH)]
    mounts = [{"name": name, "mountPath": path} for name, path in (SHM, *SCRATCH)]
    return volumes, mounts


def autoscaler_options(fixed_user: bool, read_only_root: bool) -> dict[str, Any]:
    """RayCluster `autoscalerOptions` for KubeRay's autoscaler container: the Ray
    container's security context, and the scratch folders it writes to (KubeRay mounts Ray's
    log folder /tmp/ray into it itself)."""
    return {
        "securityContext": container_security_context(fixed_user, read_only_root),
        "volumeMounts": [{"name": name, "mountPath": path} for name, path in SCRATCH],
    }
