"""Run an image with what a Kubernetes pod template gives its container, under podman.

The image smoke tests take the settings from a pod template the operator (or the chart) really
builds, so what they prove is the real hardening, not a copy of it:

    securityContext   runAsUser / runAsGroup -> --user; fsGroup -> --group-add and the group
                      owning every volume; readOnlyRootFilesystem -> --read-only with no
                      extra tmpfs (podman would add /tmp, /run, /var/tmp: a pod gets none);
                      capabilities.drop ALL -> --cap-drop all; allowPrivilegeEscalation false
                      -> no-new-privileges; seccomp RuntimeDefault -> podman's default
                      profile; runAsNonRoot -> the user must be a non-zero number
    volumes           emptyDir -> a fresh host folder (a tmpfs of sizeLimit for medium
                      Memory); configMap -> its keys as files, read-only; persistentVolumeClaim
                      -> the host folder the test names for the claim
    env               name/value pairs (valueFrom is not resolved: the tests use none)

What a cluster adds and podman does not: resource limits (cgroupfs here cannot set them),
Kubernetes DNS, the pod network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmray.api.quantity import parse_quantity


def merged_security(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's effective security context: its own fields over the pod's."""
    pod = spec.get("securityContext") or {}
    own = container.get("securityContext") or {}
    keys = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
    return {**{k: pod[k] for k in keys if k in pod}, **own, "fsGroup": pod.get("fsGroup")}


def run_options(
    spec: dict[str, Any],
    container: dict[str, Any],
    *,
    work: Path,
    claims: dict[str, Path] | None = None,
    config_maps: dict[str, dict[str, str]] | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """`podman run` options for `container` of pod `spec`; emptyDir folders go under
    `work/volumes/`, claims and ConfigMaps by name (what the API server would hold)."""
    sc = merged_security(spec, container)
    options: list[str] = []
    user, group, fs_group = sc.get("runAsUser"), sc.get("runAsGroup"), sc.get("fsGroup")
    if sc.get("runAsNonRoot"):
        # The kubelet refuses to start a runAsNonRoot container whose user is 0 or unknown.
        assert isinstance(user, int) and user != 0, f"runAsNonRoot with runAsUser {user!r}"
    if user is not None:
        options += ["--user", f"{user}:{group if group is not None else user}"]
    if fs_group is not None:
        options += ["--group-add", str(fs_group)]
    if sc.get("readOnlyRootFilesystem"):
        options += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = sc.get("capabilities") or {}
    for cap in capabilities.get("drop") or []:
        options += ["--cap-drop", cap.lower()]
    for cap in capabilities.get("add") or []:
        options += ["--cap-add", cap.lower()]
    if sc.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    assert seccomp in (None, "RuntimeDefault"), f"seccomp profile {seccomp} not translated"

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        read_only = ",ro" if mount.get("readOnly") else ""
        if "emptyDir" in volume:
            empty = volume["emptyDir"]
            if empty.get("medium") == "Memory":
                # The kernel's tmpfs takes bytes (or k/m/g), not Kubernetes' "8Gi".
                limit = empty.get("sizeLimit")
                size = f",tmpfs-size={int(parse_quantity(limit))}" if limit is not None else ""
                options += ["--mount", f"type=tmpfs,destination={target},tmpfs-mode=1777{size}"]
                continue
            source = _owned_folder(work / "volumes" / mount["name"], fs_group)
        elif "configMap" in volume:
            source = work / "configmaps" / mount["name"]
            source.mkdir(parents=True, exist_ok=True)
            data = (config_maps or {})[volume["configMap"]["name"]]
            for key, text in data.items():
                (source / key).write_text(text)
            read_only = ",ro"
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            source = _owned_folder((claims or {})[claim], fs_group)
        else:
            raise AssertionError(f"volume {mount['name']}: {sorted(volume)} not translated")
        options += ["--mount", f"type=bind,source={source},destination={target}{read_only}"]

    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env |= extra_env or {}
    for name, value in env.items():
        options += ["--env", f"{name}={value}"]
    return options


def _owned_folder(path: Path, fs_group: int | None) -> Path:
    """A volume as the kubelet hands it over with fsGroup: group-owned, group-writable,
    setgid (new files keep the group)."""
    path.mkdir(parents=True, exist_ok=True)
    if fs_group is not None:
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, d) for d in dirs)]:
                os.chown(name, -1, fs_group)
                os.chmod(name, 0o2775)
            for name in files:
                os.chown(os.path.join(root, name), -1, fs_group)
                os.chmod(os.path.join(root, name), 0o664)
    return path
