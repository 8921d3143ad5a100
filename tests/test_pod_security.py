"""Every Ray pod the operator creates meets PodSecurity "restricted".

The rules are those of the Kubernetes Pod Security Standards (kubernetes.io/docs/concepts/
security/pod-security-standards/), baseline and restricted, as the API server's PodSecurity
admission checks them on a pod template; `violations` lists what a template breaks. Checked
on every pod template (head, worker groups, the RayJob's submitter) of every golden case, and
under the chart's relaxations. On top of the profile: the user and file system the issue asks
for (uid 1000 / gid 100 / fsGroup 100, read-only root with emptyDirs where pods write, no
ServiceAccount token unless one was named, a bounded /dev/shm).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.api import load_resource
from llmray_operator import rayjob, rayservice
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings

GOLDEN = Path(__file__).parent / "golden" / "operator"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "kubernetes"

# --- the Pod Security Standards ----------------------------------------------------------------

# restricted: "Volume Types" -- only these (and no hostPath, which baseline already forbids).
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# baseline: "Sysctls" -- the safe set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def violations(spec: dict[str, Any]) -> list[str]:
    """What a pod spec breaks of the baseline and restricted profiles."""
    found: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    containers = [
        *spec.get("initContainers", []),
        *spec["containers"],
        *spec.get("ephemeralContainers", []),
    ]

    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"host namespaces: {key}")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("HostProcess: pod")
    for name, value in _sysctls(pod_sc):
        if name not in SAFE_SYSCTLS:
            found.append(f"sysctls: {name}={value}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"hostPath volume: {volume['name']}")
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume types: {volume['name']} is {sorted(kinds - ALLOWED_VOLUMES)}")
    found += _selinux("pod", pod_sc)
    found += _seccomp_not_unconfined("pod", pod_sc)

    # restricted, pod-wide parts
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_sc.get("runAsUser") == 0:
        found.append("running as non-root user: pod runAsUser 0")

    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            found.append(f"privileged: {where}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"HostProcess: {where}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                found.append(f"host ports: {where} {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"/proc mount type: {where}")
        found += _selinux(where, sc)
        found += _seccomp_not_unconfined(where, sc)
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"AppArmor: {where} {apparmor}")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"privilege escalation: {where} allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            found.append(f"running as non-root: {where} runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            found.append(f"running as non-root user: {where} runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"seccomp: {where} profile {seccomp}")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"capabilities: {where} does not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"capabilities: {where} adds {capabilities['add']}")
    return found


def _sysctls(sc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s.get("value", "")) for s in sc.get("sysctls") or []]


def _selinux(where: str, sc: dict[str, Any]) -> list[str]:
    options = sc.get("seLinuxOptions") or {}
    found = []
    if options.get("type", "") not in SELINUX_TYPES:
        found.append(f"SELinux: {where} type {options['type']}")
    if options.get("user") or options.get("role"):
        found.append(f"SELinux: {where} sets user or role")
    return found


def _seccomp_not_unconfined(where: str, sc: dict[str, Any]) -> list[str]:
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        return [f"seccomp: {where} Unconfined"]
    return []


# --- the pod templates -------------------------------------------------------------------------


def pod_templates(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of a RayJob / RayService, by where it sits."""
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        found = {"submitter": obj["spec"]["submitterPodTemplate"]}
    elif obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        found = {}
    else:
        return {}
    found["head"] = cluster["headGroupSpec"]["template"]
    if cluster.get("enableInTreeAutoscaling"):
        # KubeRay appends its autoscaler container to the head pod, with autoscalerOptions'
        # securityContext and volumeMounts (controllers/ray/common/pod.go).
        head = copy.deepcopy(found["head"])
        options = cluster.get("autoscalerOptions", {})
        autoscaler = {"name": "autoscaler", "image": "ray", **options}
        head["spec"]["containers"].append(autoscaler)
        found["head"] = head
    for group in cluster.get("workerGroupSpecs", []):
        found[f"group {group['groupName']}"] = group["template"]
    return found


def golden_templates() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(GOLDEN.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            for where, template in pod_templates(obj).items():
                found.append((f"{path.stem}: {obj['kind']} {where}", template))
    return found


GOLDEN_TEMPLATES = golden_templates()


def test_every_golden_case_has_pod_templates() -> None:
    # serve-cpu autoscales (1-3 replicas): its head carries KubeRay's autoscaler too.
    heads = dict(GOLDEN_TEMPLATES)
    assert len(heads["serve-cpu: RayService head"]["spec"]["containers"]) == 2
    cases = {name.split(":")[0] for name, _ in GOLDEN_TEMPLATES}
    assert cases == {p.stem for p in GOLDEN.glob("*.yaml")}
    assert sum("submitter" in name for name, _ in GOLDEN_TEMPLATES) >= 5  # every RayJob's
    assert len(GOLDEN_TEMPLATES) >= 21


@pytest.mark.parametrize(
    ("where", "template"), GOLDEN_TEMPLATES, ids=[n for n, _ in GOLDEN_TEMPLATES]
)
def test_every_ray_pod_meets_the_restricted_profile(where: str, template: dict) -> None:
    assert violations(template["spec"]) == [], where


@pytest.mark.parametrize(
    ("where", "template"), GOLDEN_TEMPLATES, ids=[n for n, _ in GOLDEN_TEMPLATES]
)
def test_every_ray_pod_runs_as_ray_on_a_read_only_root(where: str, template: dict) -> None:
    spec = template["spec"]
    pod_sc = spec["securityContext"]
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"], pod_sc["fsGroup"]) == (1000, 100, 100)
    container, *autoscaler = spec["containers"]
    # No token (no rayPods.serviceAccountName here), but where KubeRay's autoscaler runs.
    assert spec["automountServiceAccountToken"] is bool(autoscaler), where
    for c in autoscaler:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/home/ray/.cache"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert (sc["runAsUser"], sc["runAsGroup"]) == (1000, 100)
    # Writable only where an emptyDir is mounted: /tmp (Ray's temp dir inside), the caches,
    # /dev/shm bounded by the pod's memory limit.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for path in ("/tmp", "/home/ray/.cache", "/dev/shm"):
        assert "emptyDir" in mounts[path], (where, path)
    shm = mounts["/dev/shm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert shm["sizeLimit"] == container["resources"]["limits"]["memory"]


def test_the_check_catches_what_kuberay_creates_by_default() -> None:
    """KubeRay's default submitter pod (and a pod like the Ray templates before this change)
    breaks the profile: the check is not vacuous."""
    default_submitter = {
        "containers": [{"name": "ray-job-submitter", "image": "rayproject/ray:2.60.0"}],
        "restartPolicy": "Never",
    }
    assert {v.split(":")[0] for v in violations(default_submitter)} == {
        "privilege escalation",
        "running as non-root",
        "seccomp",
        "capabilities",
    }
    risky = {
        "hostNetwork": True,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                    "runAsUser": 0,
                },
            }
        ],
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
    }
    assert sorted(v.split(":")[0] for v in violations(risky)) == [
        "capabilities",
        "host namespaces",
        "host ports",
        "hostPath volume",
        "running as non-root user",
        "volume types",
    ]


def _built(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    owner = Owner("llmray.io/v1alpha1", "X", "x", "ml", "u")
    job = load_resource(EXAMPLES / "finetunejob-cpu-lora.yaml", kind="FineTuneJob")
    dep = load_resource(EXAMPLES / "llmdeployment-cpu.yaml", kind="LLMDeployment")
    objects = [
        rayjob.build(job, owner, settings).ray_job,
        rayservice.build(dep, owner, "pvc://models/m", settings),
    ]
    return [(where, t) for obj in objects for where, t in pod_templates(obj).items()]


def test_the_relaxations_keep_the_profile() -> None:
    """rayPods.fixedUser false (the cluster picks the user, as OpenShift does) and
    rayPods.readOnlyRootFilesystem false still pass "restricted"; a named ServiceAccount
    gets its token mounted."""
    settings = Settings(
        default_storage_uri="pvc://runs",
        ray_fixed_user=False,
        ray_read_only_root_filesystem=False,
        ray_service_account="ml-jobs",
    )
    for where, template in _built(settings):
        spec = template["spec"]
        assert violations(spec) == [], where
        assert (
            "runAsUser" not in spec["securityContext"] and "fsGroup" not in spec["securityContext"]
        )
        container = spec["containers"][0]
        assert "runAsUser" not in container["securityContext"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is False
        assert spec["automountServiceAccountToken"] is True
        assert spec["serviceAccountName"] == "ml-jobs"


def test_settings_read_the_relaxations_from_the_chart_variables() -> None:
    settings = Settings.from_env(
        {"LLMRAY_RAY_FIXED_USER": "false", "LLMRAY_RAY_READ_ONLY_ROOT_FILESYSTEM": "false"}
    )
    assert settings.ray_fixed_user is False and settings.ray_read_only_root_filesystem is False
    assert Settings.from_env({}).ray_fixed_user is True
